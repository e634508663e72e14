"""The checkpoint store on local disk and on S3 alike: commit, verify, latest, fallback past
every kind of damage, two writers of one step, retention (manifest first) and the clean-up of
crashed writers' leftovers. Damage is done to the real bytes, outside the code under test."""

from __future__ import annotations

import json
import logging
import os
import threading
import time

import pytest
import torch

from ftrain import ckpt as ckpt_tool
from ftrain.checkpoint import (
    FORMAT_VERSION,
    MANIFEST,
    Checkpointer,
    CheckpointStore,
    Manifest,
    load_uri,
    step_dirname,
)
from ftrain.checkpoint.store import UNEVALUATED
from ftrain.storage import Storage, StorageError, checksum
from tests.harness.checkpoints import assert_bitwise_equal
from tests.harness.s3 import CORRUPTIONS, Fault, S3Bucket, save_checkpoint

D10, D20, D30 = step_dirname(10), step_dirname(20), step_dirname(30)


def store_at(backend, prefix: str = "run") -> CheckpointStore:
    return CheckpointStore(Storage(backend.uri(prefix)))


def tool(*argv: str, capsys) -> tuple[int, str]:
    """The ckpt tool's own entry point, in this process (its CLI is tested in test_ckpt_tool)."""
    code = ckpt_tool.main(list(argv))
    out = capsys.readouterr()
    return code, out.out + out.err


def test_commit_verify_and_latest(backend):
    uri = backend.uri("run")
    save_checkpoint(uri, 10)
    want = save_checkpoint(uri, 20, epochs_done=1)
    store = store_at(backend)
    got = store.latest()
    assert got.name == D20 and got.manifest.step == 20 and got.train_state["epoch"] == 1
    assert_bitwise_equal(got.state["model"], want)
    manifest = json.loads(backend.read(f"run/{D20}/{MANIFEST}"))
    assert sorted(manifest["files"]) == sorted(k.rsplit("/", 1)[1] for k in
                                               backend.keys(f"run/{D20}/") if MANIFEST not in k)
    for name, meta in manifest["files"].items():
        assert len(backend.read(f"run/{D20}/{name}")) == meta["size"]
    assert [(e.step, e.valid) for e in store.entries()] == [(20, True), (10, True)]


@pytest.mark.parametrize("damage", CORRUPTIONS, ids=lambda c: c.name)
def test_damaged_newest_falls_back_to_the_one_before(backend, damage, caplog, capsys):
    uri = backend.uri("run")
    want = save_checkpoint(uri, 10)
    save_checkpoint(uri, 20)
    damage.apply(backend, f"run/{D20}")
    with caplog.at_level(logging.WARNING, logger="ftrain.checkpoint"):
        got = store_at(backend).latest()
    assert got.name == D10
    assert_bitwise_equal(got.state["model"], want)
    warning = next(r.getMessage() for r in caplog.records if "SKIPPING" in r.getMessage())
    assert f"{uri}/{D20}" in warning and damage.expect in warning
    # The tool reports it.
    code, out = tool("ls", uri, capsys=capsys)
    assert code == 0
    line20 = next(ln for ln in out.splitlines() if ln.endswith(D20))
    assert "INVALID" in line20 and damage.expect in line20
    assert "valid" in next(ln for ln in out.splitlines() if ln.endswith(D10))
    code, out = tool("verify", uri, capsys=capsys)
    assert code == 1 and "1 valid, 1 invalid" in out


def test_none_valid(backend):
    uri = backend.uri("run")
    save_checkpoint(uri, 10)
    CORRUPTIONS[0].apply(backend, f"run/{D10}")
    assert store_at(backend).latest() is None
    with pytest.raises(FileNotFoundError, match="no valid checkpoint"):
        load_uri(uri)


def test_a_long_lived_store_sees_new_checkpoints(backend):
    store = store_at(backend)
    assert store.latest() is None
    save_checkpoint(backend.uri("run"), 10)
    assert store.latest().name == D10
    save_checkpoint(backend.uri("run"), 20)
    assert store.latest().name == D20


def _commit(store: CheckpointStore, step: int, writer: str, epoch: int = 0,
            reason: str | None = None) -> bool:
    """A commit with stand-in bytes (what is verified is sizes and hashes, not tensors)."""
    files = {f"state-{writer}.pt": b"weights of " + writer.encode(),
             f"train_state-{writer}.json": b"{}"}
    manifest = Manifest(format_version=FORMAT_VERSION, step=step, epoch=epoch,
                        state_file=f"state-{writer}.pt",
                        train_state_file=f"train_state-{writer}.json", reason=reason)
    return store.commit(step, files, manifest, writer)


def test_the_evaluated_epoch_end_replaces_the_survivors_unevaluated_one(backend):
    """A peer died in the evaluation of epoch 1, ending at step 10: the survivor checkpointed
    step 10 unevaluated. The resumed run evaluates and saves step 10 again (epoch 1 done): it
    takes the place of the survivor's; nothing else replaces a committed step."""
    store = store_at(backend)
    assert _commit(store, 10, "survivor", epoch=0, reason=UNEVALUATED) is True
    assert _commit(store, 10, "other", epoch=0, reason="peer_failed") is False  # not evaluated
    assert _commit(store, 10, "resumed", epoch=1, reason="epoch") is True
    assert store.read_manifest(D10).writer == "resumed"
    assert [k for k in backend.keys(f"run/{D10}/") if ".superseded-" in k]
    assert _commit(store, 10, "late", epoch=1, reason="epoch") is False


def test_second_writer_of_a_step_fails_cleanly(backend, caplog):
    store = store_at(backend)
    assert _commit(store, 10, "oldpod") is True
    with caplog.at_level(logging.WARNING, logger="ftrain.checkpoint"):
        assert _commit(store, 10, "newpod") is False
    assert "already committed by writer oldpod" in caplog.text and "newpod" in caplog.text
    assert json.loads(backend.read(f"run/{D10}/{MANIFEST}"))["writer"] == "oldpod"
    assert backend.read(f"run/{D10}/state-oldpod.pt") == b"weights of oldpod"
    assert not [k for k in backend.keys("run/") if "newpod" in k]


def test_racing_writers_exactly_one_commits(backend):
    """Two writers commit the same steps at the same moment: one wins each step."""
    store_a, store_b = store_at(backend), store_at(backend)
    for step in (10, 20, 30):
        start = threading.Barrier(2)
        results = {}

        def go(store, writer, step=step, start=start, results=results):
            start.wait()
            results[writer] = _commit(store, step, writer)

        threads = [threading.Thread(target=go, args=(store_a, "a")),
                   threading.Thread(target=go, args=(store_b, "b"))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert sorted(results.values()) == [False, True], results
        winner = next(w for w, ok in results.items() if ok)
        manifest, _ = store_a.read_verified(step_dirname(step))
        assert manifest.writer == winner


def test_a_corrupt_committed_step_is_written_again(backend):
    uri = backend.uri("run")
    save_checkpoint(uri, 10)
    CORRUPTIONS[1].apply(backend, f"run/{D10}")  # flip a byte
    want = save_checkpoint(uri, 10)  # a new writer saves the same step
    got = store_at(backend).latest()
    assert got.name == D10
    assert_bitwise_equal(got.state["model"], want)
    assert [k for k in backend.keys(f"run/{D10}/") if ".corrupt-" in k]  # kept for inspection


def test_retention_keeps_the_newest(backend):
    uri = backend.uri("run")
    for step in (10, 20, 30, 40):
        save_checkpoint(uri, step)
    store = store_at(backend)
    assert store.retain(keep_last=2, grace_s=3600) == [step_dirname(20), D10]
    assert [s for s, _ in store.step_dirs()] == [40, 30]
    assert not [k for k in backend.keys("run/") if D10 in k or D20 in k]  # nothing left behind
    assert store.retain(keep_last=1, grace_s=3600) == []  # at least 2 are always kept


def test_damaged_manifests_do_not_count_towards_keep_last(backend):
    uri = backend.uri("run")
    for step in (10, 20, 30):
        save_checkpoint(uri, step)
    backend.write(f"run/{D30}/{MANIFEST}", b"garbage")
    store = store_at(backend)
    assert store.retain(keep_last=2, grace_s=3600) == []  # 20 and 10 are the last good ones
    save_checkpoint(uri, 40)
    assert store.retain(keep_last=2, grace_s=3600) == [D10]
    save_checkpoint(uri, 50)
    assert store.retain(keep_last=2, grace_s=3600) == [D30, D20]


def test_leftovers_of_crashed_writers_are_removed_after_the_grace_period(backend):
    uri = backend.uri("run")
    backend.write(f"run/{step_dirname(5)}/state-crashed.pt", b"half a checkpoint")
    save_checkpoint(uri, 10)
    save_checkpoint(uri, 20)
    backend.write(f"run/{D20}/state-loser.pt", b"a losing writer's copy")
    store = store_at(backend)
    assert store.retain(keep_last=2, grace_s=600) == []  # too young to be called abandoned
    assert backend.keys(f"run/{step_dirname(5)}/")
    later = time.time() + 601
    assert store.retain(keep_last=2, grace_s=600, now=later) == [step_dirname(5)]
    assert not backend.keys(f"run/{step_dirname(5)}/")
    assert not [k for k in backend.keys("run/") if "loser" in k]
    assert [e.valid for e in store.entries()] == [True, True]


def test_retention_deletes_the_manifest_first(backend, monkeypatch, request):
    """A deletion that dies half-way leaves a folder that does not look committed."""
    uri = backend.uri("run")
    for step in (10, 20, 30):
        save_checkpoint(uri, step)
    on_s3 = isinstance(backend, S3Bucket)
    if on_s3:  # the bulk delete of the data fails for good, on the wire
        proxy = request.getfixturevalue("fault_proxy")
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        proxy.set_faults(Fault("503", method="POST", path=r"\?delete"))
    store = store_at(backend)
    with monkeypatch.context() as patch, pytest.raises(StorageError):
        if not on_s3:
            def dies(self, rel):
                raise StorageError(f"delete {rel}: the disk went away")

            patch.setattr(Storage, "remove_tree", dies)
        store.retain(keep_last=2, grace_s=3600)
    assert not backend.keys(f"run/{D10}/{MANIFEST}")
    assert backend.keys(f"run/{D10}/")  # the data files are still there ...
    assert store.committed_names() == [D30, D20]  # ... but nothing looks committed
    assert store.latest().name == D30
    if on_s3:
        deletes = [r for r in proxy.requests if r.method in ("DELETE", "POST")]
        assert deletes[0].method == "DELETE" and deletes[0].target.endswith(f"{D10}/{MANIFEST}")
        assert deletes[1:] and all(b"state-" in r.body for r in deletes[1:])  # data came after
        proxy.set_faults()
    assert store.retain(keep_last=2, grace_s=600, now=time.time() + 601) == [D10]
    assert not backend.keys(f"run/{D10}/")


def test_lost_answer_to_the_manifest_upload_still_commits(s3, fault_proxy, monkeypatch):
    """S3 stored the manifest but the answer was lost; the retry meets 412 on the writer's own
    manifest. Before: taken for another writer's commit, the data files were deleted under a
    committed manifest."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", fault_proxy.url)
    fault_proxy.set_faults(Fault("reset_after", method="PUT", path=r"manifest\.json", times=1))
    want = save_checkpoint(s3.uri("run"), 10)
    assert fault_proxy.injected() == {"reset_after": 1}
    assert_bitwise_equal(load_uri(s3.uri("run")).state["model"], want)


def test_a_failed_save_is_retried_at_the_same_step(s3, fault_proxy, monkeypatch, caplog):
    monkeypatch.setenv("AWS_ENDPOINT_URL", fault_proxy.url)
    store = store_at(s3)
    saver = Checkpointer(store, keep_last=3, orphan_grace_s=3600)
    model = torch.nn.Linear(4, 2)
    args = (10, {"model": model.state_dict()}, {"epoch": 0, "step": 10}, {"epoch": 0})
    fault_proxy.set_faults(Fault("503", method="PUT", path=r"manifest\.json"))
    with caplog.at_level(logging.ERROR, logger="ftrain.checkpoint"):
        assert saver.save(*args, blocking=True) is False
    assert "SAVE FAILED" in caplog.text and saver.consecutive_failures == 1
    assert [k for k in s3.keys("run/") if "state-" in k]  # the data files got there
    fault_proxy.set_faults()
    assert saver.save(*args, blocking=True) is True
    saver.close()
    assert saver.consecutive_failures == 0
    assert store.latest().name == D10


def test_large_files_move_in_parallel_parts(s3, fault_proxy, monkeypatch):
    """A file of several parts is a multipart upload whose parts are in flight together, and a
    read of it is parallel ranged GETs; create-only holds for the multipart commit too."""
    from tests.harness.s3 import most_in_flight

    monkeypatch.setenv("AWS_ENDPOINT_URL", fault_proxy.url)
    part = 5 * 2**20  # S3's smallest part
    storage = Storage(s3.uri("big"), {"default_block_size": part, "max_concurrency": 4})
    data = os.urandom(4 * part + 12345)  # 5 parts
    # Each part's answer held back 0.3 s: in series they would never overlap.
    fault_proxy.set_faults(Fault("slow", method="PUT", path=r"partNumber=", delay=0.3),
                           Fault("slow", method="GET", path=r"/big/state\.pt", delay=0.3))
    size, digest = storage.write("state.pt", data, create_only=True)
    assert (size, digest) == (len(data), checksum(data))
    parts = [r for r in fault_proxy.requests if r.method == "PUT" and "partNumber=" in r.target]
    assert len(parts) == 5
    assert most_in_flight(parts) >= 2, [(r.started, r.ended) for r in parts]
    assert s3.read("big/state.pt") == data and s3.multipart_uploads() == []

    fault_proxy.requests.clear()
    assert storage.read("state.pt") == data
    gets = [r for r in fault_proxy.requests if r.method == "GET" and "state.pt" in r.target]
    assert len(gets) == 5 and all(r.range.startswith("bytes=") for r in gets)
    assert most_in_flight(gets) >= 2
    # A range of it (what a rank loads of another rank's shard file) the same way, part by
    # part; past the end of the file there is simply less.
    fault_proxy.requests.clear()
    assert storage.read_range("state.pt", 1000, 3 * part + 7) == data[1000:3 * part + 7]
    gets = [r for r in fault_proxy.requests if r.method == "GET" and "state.pt" in r.target]
    assert sorted((r.range for r in gets), key=lambda r: int(r[6:].split("-")[0])) == [
        f"bytes={a}-{b - 1}" for a, b in ((1000, part + 1000), (part + 1000, 2 * part + 1000),
                                         (2 * part + 1000, 3 * part + 7))]
    assert most_in_flight(gets) >= 2
    assert storage.read_range("state.pt", len(data) - 10, len(data) + 99) == data[-10:]

    # A second writer of the same name, also multipart, is refused: the commit stays the
    # first writer's and no upload is left behind.
    fault_proxy.set_faults()
    with pytest.raises(FileExistsError):
        storage.write("state.pt", os.urandom(len(data)), create_only=True)
    assert s3.read("big/state.pt") == data and s3.multipart_uploads() == []
