"""Bad input (issue 10) that needs no training run: each case gets a clear message naming the
flag or file at fault, the right exit code, and never costs a good checkpoint.

1. a manifest naming a path outside its checkpoint folder      invalid, skipped, reported
4. unknown keys, wrong types, zero or negative sizes           exit 2, the key and file named
8. the search for a known secret itself
9. a task's loss answering in another shape than (loss, dict)    exit 2, what to return

Cases 2, 3 and 5 to 8 in real runs: tests/integration/test_bad_input.py. Already covered
elsewhere and not repeated here: half-truncated, bit-flipped, deleted and garbage files
(tests/unit/test_store_s3.py), no valid checkpoint on S3 (tests/integration/test_faults.py), a
--model change (tests/integration/test_compat.py), every config problem reported at once
(tests/unit/test_config.py).
"""
from __future__ import annotations

import errno
import json
import logging
import os
import shutil
from pathlib import Path

import pytest

from ftrain import ckpt as ckpt_tool
from ftrain.checkpoint import MANIFEST, CheckpointStore, step_dirname
from ftrain.runtime import exitcodes
from ftrain.storage import Storage, StorageError, checksum
from ftrain.train import main as train_main
from tests.harness.checkpoints import committed_steps
from tests.harness.s3 import save_checkpoint
from tests.harness.secrets import assert_secret_absent

D10, D20 = step_dirname(10), step_dirname(20)


def state_file(folder: Path) -> Path:
    """The model file of a checkpoint written once (a rewritten one holds strays as well)."""
    (path,) = folder.glob("state-*")
    return path


# ---------------------------------------------------------------------------- 1. paths
@pytest.mark.parametrize("bad", ["../stolen.pt", "a/../../stolen.pt", "../../stolen.pt",
                                 "{tmp}/stolen.pt", "/etc/passwd"])
def test_manifest_naming_a_path_outside_its_folder_is_invalid(tmp_path, bad, caplog, capsys):
    """A manifest whose file table points outside its folder (so that a valid-looking
    checkpoint would be read from elsewhere) makes the checkpoint invalid: skipped with a
    warning naming the entry, reported by `ckpt verify`, and nothing outside is read or
    deleted. The file it names really is there, with the size and checksum the manifest
    records, so only the path check can refuse it."""
    root = tmp_path / "a" / "run"
    save_checkpoint(str(root), 10)
    save_checkpoint(str(root), 20)
    folder = root / D20
    bad = bad.format(tmp=tmp_path)
    target = Path(os.path.normpath(folder / bad))
    (folder / "a").mkdir()  # so that the kernel resolves a/../.. as well
    if bad != "/etc/passwd":
        shutil.move(state_file(folder), target)
    data = target.read_bytes()
    manifest = json.loads((folder / MANIFEST).read_text())
    train_file = manifest["train_state_file"]
    manifest["files"] = {bad: {"size": len(data), "algorithm": "xxh3-128",
                               "digest": checksum(data)},
                         train_file: manifest["files"][train_file]}
    manifest["state_file"] = bad
    (folder / MANIFEST).write_text(json.dumps(manifest))
    uri = str(root)

    with caplog.at_level(logging.WARNING, logger="ftrain.checkpoint"):
        got = CheckpointStore(Storage(uri)).latest()
    assert got is not None and got.name == D10  # the one before
    warning = next(r.getMessage() for r in caplog.records if "SKIPPING" in r.getMessage())
    assert f"{uri}/{D20}" in warning and f"{MANIFEST} names {bad!r}" in warning, warning
    assert "outside its checkpoint folder" in warning, warning

    code, out = tool(capsys, "verify", uri)
    assert code == 1 and f"INVALID {uri}/{D20}: {MANIFEST} names {bad!r}" in out, out
    assert "1 valid, 1 invalid" in out
    code, out = tool(capsys, "verify", f"{uri}/{D20}")
    assert code == 1 and "outside its checkpoint folder" in out, out

    # Retention deletes the bad checkpoint's folder once newer ones exist, and nothing else.
    save_checkpoint(uri, 30)
    save_checkpoint(uri, 40)
    CheckpointStore(Storage(uri)).retain(2, grace_s=0)
    assert committed_steps(root) == [30, 40]
    assert target.read_bytes() == data  # never deleted, never changed


def test_manifest_entry_without_a_size_is_invalid_not_a_crash(tmp_path, caplog):
    """Valid JSON, but a file's entry is not a table: skipped like any damage (it crashed the
    loader with AttributeError before)."""
    uri = str(tmp_path / "run")
    save_checkpoint(uri, 10)
    save_checkpoint(uri, 20)
    path = tmp_path / "run" / D20 / MANIFEST
    manifest = json.loads(path.read_text())
    manifest["files"][manifest["state_file"]] = 54477
    path.write_text(json.dumps(manifest))
    with caplog.at_level(logging.WARNING, logger="ftrain.checkpoint"):
        assert CheckpointStore(Storage(uri)).latest().name == D10
    assert (f"SKIPPING checkpoint {uri}/{D20}: {MANIFEST}: the entry of "
            f"{manifest['state_file']!r} has no size") in caplog.text


def tool(capsys, *argv: str) -> tuple[int, str]:
    code = ckpt_tool.main(list(argv))
    out = capsys.readouterr()
    return code, out.out + out.err


# ---------------------------------------------------------------------------- 4. config
@pytest.fixture
def in_process(monkeypatch):
    """For calling the training entry point in this process: no FTT_* variables, and the root
    logger (which ``main`` configures for its process) restored afterwards."""
    for key in [k for k in os.environ if k.startswith("FTT_")]:
        monkeypatch.delenv(key)
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.mark.parametrize(("yaml_text", "argv", "want"), [
    ("batchsize: 16\n", [], ["--config: '{yaml}' has unknown option 'batchsize' (did you mean "
                             "'batch_size'?)"]),
    ("batch_size: abc\n", [], ["--batch-size (from {yaml}:batch_size): 'abc' is invalid: "
                               "expected an integer"]),
    ('batch_size: "abc"\n', [], ["--batch-size (from {yaml}:batch_size): 'abc' is invalid"]),
    ("batch_size: 0\n", [], ["--batch-size (from {yaml}:batch_size): must be > 0, got 0"]),
    ("epochs: -1\nlr: 0\n", [], ["--epochs (from {yaml}:epochs): must be > 0, got -1",
                                 "--lr (from {yaml}:lr): must be > 0"]),
    ("", ["--epochs", "x"], ["--epochs: 'x' is invalid: expected an integer"]),
    ("", ["--batch-size", "0"], ["--batch-size: must be > 0, got 0"]),
    ("", ["--batch-size", "-4"], ["--batch-size: must be > 0, got -4"]),
    ("", ["--batch-size", "2.5"], ["--batch-size: '2.5' is invalid: expected an integer"]),
], ids=["yaml-unknown", "yaml-type", "yaml-quoted-type", "yaml-zero", "yaml-negative",
        "cli-type", "cli-zero", "cli-negative", "cli-fraction"])
def test_bad_config_exits_2_naming_the_key_and_the_file(tmp_path, in_process, capfd,
                                                        yaml_text, argv, want):
    if yaml_text:
        yaml = tmp_path / "job.yaml"
        yaml.write_text(yaml_text)
        argv = ["--config", str(yaml), *argv]
    # A small job: were a check missing, this would train it here (and fail below).
    quick = ["--model", "mlp", "--width", "8", "--depth", "1", "--max-steps", "1"]
    assert train_main([*argv, *quick, "--checkpoint-dir", str(tmp_path / "ckpt")]) == 2
    err = capfd.readouterr().err
    assert err.startswith("error: invalid configuration:"), err
    for text in want:
        assert text.format(yaml=tmp_path / "job.yaml") in err, err
    assert not (tmp_path / "ckpt").exists()


def test_env_values_name_their_variable():
    from ftrain.config import ConfigError, load_config

    with pytest.raises(ConfigError) as e:
        load_config([], environ={"FTT_BATCH_SIZE": "0"})
    assert "--batch-size (from $FTT_BATCH_SIZE): must be > 0, got 0" in e.value.problems


def test_unknown_flag_exits_2_naming_it(in_process, capfd):
    with pytest.raises(SystemExit) as e:
        train_main(["--batchsize", "16"])
    assert e.value.code == exitcodes.INVALID
    assert "unrecognized arguments: --batchsize 16" in capfd.readouterr().err


# ---------------------------------------------------------------------------- 9. Task.loss
@pytest.mark.parametrize(("task", "want"), [
    ("BareLossTask", "BareLossTask.loss returned a tensor of shape (); it must return a pair: "
                     "the loss (summed over the batch's items, or their mean with "
                     "loss_reduction = 'mean') and a dict of metric sums, for example "
                     "`return loss, {'loss': loss.detach()}`"),
    ("ListSumsTask", "ListSumsTask.loss returned a pair whose second value is a list, not a "
                     "dict; it must return a pair"),
    ("ShiftingSumsTask", "ShiftingSumsTask.loss returned the metric sums ['xent']; earlier "
                         "batches returned ['loss']: return the same names every time"),
])
def test_a_loss_of_another_shape_exits_2_saying_what_to_return(tmp_path, in_process, capfd,
                                                               task, want):
    """A script's loss function ported as it is answers with the loss alone: the run stops at
    its first step with the task named and what to return, not Python's unpacking error."""
    argv = ["--task", f"tests.harness.tasks:{task}", "--batch-size", "16", "--epochs", "1",
            "--checkpoint-dir", str(tmp_path / "ckpt")]
    assert train_main(argv) == exitcodes.INVALID
    err = capfd.readouterr().err
    assert f"error: {want}" in err, err
    assert "Traceback" not in err
    assert committed_steps(tmp_path / "ckpt") == []


def test_a_type_error_inside_the_loss_stays_the_tasks_own(tmp_path, in_process):
    """Only the answer's shape is checked: a TypeError raised by the task's code is its bug,
    with its traceback (a run exits 1 on it: tests/integration/test_exit.py)."""
    with pytest.raises(TypeError, match="cross_entropy"):
        train_main(["--task", "tests.harness.tasks:TypeErrorTask", "--batch-size", "16",
                    "--epochs", "1", "--checkpoint-dir", str(tmp_path / "ckpt")])


def test_predict_with_a_loss_changed_since_training_exits_2(tmp_path, in_process, capfd,
                                                            monkeypatch):
    """``ftrain.predict`` on a checkpoint whose task's loss was edited since: the same
    message, exit 2."""
    from ftrain import predict
    from tests.harness.tasks import ChangedLossTask

    argv = ["--task", "tests.harness.tasks:ChangedLossTask", "--batch-size", "16", "--epochs",
            "1", "--checkpoint-dir", str(tmp_path / "ckpt")]
    assert train_main(argv) == exitcodes.OK
    capfd.readouterr()
    monkeypatch.setattr(ChangedLossTask, "bare", True)
    assert predict.main(["--checkpoint", str(tmp_path / "ckpt"), "--device", "cpu"]) == 2
    assert "error: ChangedLossTask.loss returned a tensor of shape ()" in capfd.readouterr().err


# ---------------------------------------------------------------------------- 8. secrets


def test_assert_secret_absent_finds_it(tmp_path):
    """The search itself: in text, in a nested file (as bytes), in a blob, in an exception's
    cause, JSON-escaped."""
    secret = 'k3y"/+=' + os.urandom(4).hex()
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "b" / "events.bin").write_bytes(b"\x00\x01" + secret.encode() + b"\xff")
    for kwargs in ({"texts": [f"x {secret} y"]}, {"paths": [tmp_path]},
                   {"blobs": {"k": json.dumps({"s": secret}).encode()}}):
        with pytest.raises(AssertionError, match="secret found in"):
            assert_secret_absent(secret, **kwargs)
    try:
        try:
            raise OSError(errno.EACCES, f"denied for {secret}")
        except OSError as inner:
            raise StorageError("read failed") from inner
    except StorageError as e:
        with pytest.raises(AssertionError, match="secret found in exception"):
            assert_secret_absent(secret, exceptions=[e])
    assert assert_secret_absent("not-there", texts=["a"], paths=[tmp_path]) == 2
