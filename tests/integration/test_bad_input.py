"""Bad input (issue 10) in real runs: each case gets a clear message naming the flag or file at
fault, the right exit code, and never costs a good checkpoint.

2. zero-length and truncated files                             skipped, resume from the one before
3. a checkpoint of another architecture                        exit 2, checkpoint untouched
5. a missing bucket                                            exit 2, the bucket named
6. wrong credentials (403)                                     exit 2, not retried, no secret shown
7. the disk full while saving                                  previous checkpoint intact, 140
8. a known secret                                              found in no log, file or exception

Training runs are single processes on a tiny MLP (4 steps per epoch, about 3 s each). The
cases that need no run (1. paths outside a checkpoint folder, 4. bad configuration, the secret
search itself) are in tests/unit/test_bad_input.py.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from ftrain import ckpt as ckpt_tool
from ftrain.checkpoint import MANIFEST, step_dirname
from ftrain.checkpoint.rawstate import load_state
from ftrain.data.remote import fetch_remote_data_dir
from ftrain.runtime import exitcodes
from ftrain.storage import Storage, StorageAccessError, StorageError, checksum
from tests.harness import logs
from tests.harness.checkpoints import committed_steps
from tests.harness.processes import ROOT, ckpt, free_port, run_train, start_train
from tests.harness.s3 import Fault
from tests.harness.secrets import assert_secret_absent

# 64 samples in global batches of 16: 4 steps per epoch, 8 in all; a 54 KiB checkpoint.
TINY = ["--synthetic-train-size", "64", "--synthetic-test-size", "32", "--batch-size", "16",
        "--epochs", "2", "--model", "mlp", "--width", "8", "--depth", "1",
        "--log-every-steps", "0", "--save-every-seconds", "0"]
D2, D4, D6 = (step_dirname(s) for s in (2, 4, 6))


def tool(capsys, *argv: str) -> tuple[int, str]:
    code = ckpt_tool.main(list(argv))
    out = capsys.readouterr()
    return code, out.out + out.err


def fingerprint(folder: Path) -> dict[str, str]:
    """Every file below ``folder`` with the SHA-256 of its bytes: 'untouched' means equal."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def state_file(folder: Path) -> Path:
    """The model file of a checkpoint written once (a rewritten one holds strays as well)."""
    (path,) = folder.glob("state-*")
    return path


# ---------------------------------------------------------------------------- 2. short files
def test_zero_length_and_truncated_files_are_skipped_until_none_is_valid(tmp_path):
    """A zero-length manifest and a truncated model file: each skipped with a warning naming
    the file, the run resumes from the checkpoint before them. When none is valid the job
    exits 2 and says how to start over; it never silently starts from step 0."""
    d = tmp_path / "ckpt"
    for step in (2, 4, 6):  # one run each: a blocking save commits every one of them
        r = run_train([*TINY, "--checkpoint-dir", str(d), "--max-steps", str(step)])
        assert r.returncode == 0, r.stderr[-3000:]
    assert committed_steps(d) == [2, 4, 6]
    (d / D6 / MANIFEST).write_bytes(b"")  # zero-length manifest
    shard = state_file(d / D4)
    size = shard.stat().st_size
    with open(shard, "r+b") as fh:
        fh.truncate(size // 3)  # a truncated model file

    code = ckpt("verify", str(d))
    assert code.returncode == 1, code.stdout + code.stderr
    assert f"INVALID {d}/{D6}: {MANIFEST} is empty (0 bytes" in code.stdout, code.stdout

    r = run_train([*TINY, "--checkpoint-dir", str(d)])
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"SKIPPING checkpoint {d}/{D6}: {MANIFEST} is empty (0 bytes" in r.stderr, r.stderr
    assert (f"SKIPPING checkpoint {d}/{D4}: {shard.name} has {size // 3} bytes, manifest says "
            f"{size} (truncated?)") in r.stderr, r.stderr
    assert f"resumed from {d}/{D2}: 0 epochs done, step 2" in r.stderr
    assert committed_steps(d)[-1] == 8

    for manifest in d.glob(f"step_*/{MANIFEST}"):  # zero-length model files everywhere
        if manifest.stat().st_size:  # (an empty one is invalid already)
            (manifest.parent / json.loads(manifest.read_text())["state_file"]).write_bytes(b"")
    before = fingerprint(d)
    r = run_train([*TINY, "--checkpoint-dir", str(d), "--epochs", "3"])
    assert r.returncode == exitcodes.INVALID, r.stderr[-3000:]
    assert "has 0 bytes" in r.stderr and "holds checkpoints but none is valid" in r.stderr
    assert "--resume never" in r.stderr and "Traceback" not in r.stderr
    assert fingerprint(d) == before  # nothing started over them


# ---------------------------------------------------------------------------- 3. architecture
@pytest.fixture(scope="module")
def mlp8(tmp_path_factory) -> Path:
    """A checkpoint of the tiny MLP (width 8) at step 4."""
    d = tmp_path_factory.mktemp("arch") / "ckpt"
    r = run_train([*TINY, "--checkpoint-dir", str(d), "--max-steps", "4"])
    assert r.returncode == 0, r.stderr[-3000:]
    return d


def test_resume_with_another_width_exits_2_and_leaves_the_checkpoint(mlp8):
    before = fingerprint(mlp8)
    r = run_train([*TINY, "--checkpoint-dir", str(mlp8), "--width", "16"])
    assert r.returncode == exitcodes.INVALID, r.stderr[-3000:]
    assert "--width: checkpoint 8, now 16" in r.stderr, r.stderr
    assert "Use the original settings, or --resume never with a new --checkpoint-dir" in r.stderr
    assert "Traceback" not in r.stderr
    assert fingerprint(mlp8) == before


def test_weights_that_do_not_fit_the_model_exit_2_and_leave_the_checkpoint(tmp_path, mlp8):
    """Same flags, but the checkpoint's weights have another shape (the task's code changed
    under the same name): refused with the parameter and both shapes named."""
    d = tmp_path / "ckpt"
    shutil.copytree(mlp8, d)
    folder = d / D4
    shard = state_file(folder)
    state = load_state(shard.read_bytes())  # the raw layout (checkpoint/rawstate.py)
    name = next(k for k in state["model"] if k.endswith("weight"))
    state["model"][name] = torch.zeros(state["model"][name].shape[0] * 2,
                                       state["model"][name].shape[1])
    torch.save(state, shard)  # a torch.save zip in its place loads too
    data = shard.read_bytes()
    manifest = json.loads((folder / MANIFEST).read_text())
    manifest["files"][shard.name].update(size=len(data), digest=checksum(data))
    (folder / MANIFEST).write_text(json.dumps(manifest))
    before = fingerprint(d)

    r = run_train([*TINY, "--checkpoint-dir", str(d)])
    assert r.returncode == exitcodes.INVALID, r.stderr[-3000:]
    assert f"checkpoint {d}/{D4} does not fit this model/optimizer" in r.stderr, r.stderr
    assert f"size mismatch for {name}" in r.stderr and "torch.Size([16, " in r.stderr
    assert "--task" in r.stderr and "new --checkpoint-dir" in r.stderr
    assert "Traceback" not in r.stderr
    assert fingerprint(d) == before


# ---------------------------------------------------------------------------- 5. missing bucket
def test_missing_bucket_exits_2_naming_the_bucket(s3, tmp_path, capsys):
    r = run_train([*TINY, "--checkpoint-dir", "s3://no-such-bucket/run"], env=s3.env)
    assert r.returncode == exitcodes.INVALID, r.stderr[-3000:]
    assert ("error: --checkpoint-dir s3://no-such-bucket/run: the bucket 'no-such-bucket' does "
            "not exist (S3 NoSuchBucket): create it, or fix the bucket name") in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and "training" not in r.stderr
    # The tools say so too, instead of "no checkpoints under".
    code, out = tool(capsys, "ls", "s3://no-such-bucket/run")
    assert code == 1 and "the bucket 'no-such-bucket' does not exist" in out, out
    with pytest.raises(StorageAccessError, match="no-such-bucket"):
        Storage("s3://no-such-bucket/run").listdir()
    # A --data-dir in a missing bucket is bad input as well (exit 2), not an outage (140).
    with pytest.raises(StorageAccessError, match="the bucket 'no-such-bucket' does not exist"):
        fetch_remote_data_dir("s3://no-such-bucket/data", str(tmp_path / "cache"), {})


# ---------------------------------------------------------------------------- 6. 403
SECRET_403 = "sEcReT403-" + os.urandom(12).hex()


def test_wrong_credentials_exit_2_at_once_without_the_secret(s3, fault_proxy):
    fault_proxy.set_faults(Fault("403"))  # S3 refuses these credentials, whatever the request
    env = {**s3.env, "AWS_ENDPOINT_URL": fault_proxy.url, "AWS_SECRET_ACCESS_KEY": SECRET_403}
    r = run_train([*TINY, "--checkpoint-dir", s3.uri("run")], env=env)
    assert r.returncode == exitcodes.INVALID, r.stderr[-3000:]
    assert not exitcodes.is_retryable(r.returncode)
    assert (f"error: --checkpoint-dir {s3.uri('run')}: access to the bucket 'ftt-test' was "
            "denied (S3 AccessDenied, HTTP 403) for upload ") in r.stderr, r.stderr
    assert ": check the credentials (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, AWS_PROFILE" \
        in r.stderr
    assert "Traceback" not in r.stderr
    assert len(fault_proxy.requests) <= 2, fault_proxy.requests  # no retry storm
    assert_secret_absent(SECRET_403, texts=[r.stdout, r.stderr])

    # The storage layer alone: a 403 is never retried, and its error carries no secret.
    fault_proxy.requests.clear()
    st = Storage(s3.uri("run"), {"endpoint_url": fault_proxy.url, "key": "AKIDBADINPUT",
                                 "secret": SECRET_403})
    for call in (lambda: st.read("x"), lambda: st.write("x", b"1"), st.listdir):
        with pytest.raises(StorageAccessError, match="'ftt-test' was denied") as err:
            call()
        assert_secret_absent(SECRET_403, exceptions=[err.value])
    assert len(fault_proxy.requests) == 3, [(r.method, r.target) for r in fault_proxy.requests]


def test_no_credentials_at_all_exit_2_at_once(s3, tmp_path):
    """No key anywhere: botocore cannot sign. That was retried for the whole deadline and then
    exited 140, 'rerun once storage is reachable', which no rerun fixes."""
    env = {k: v for k, v in s3.env.items() if k not in ("AWS_ACCESS_KEY_ID",
                                                         "AWS_SECRET_ACCESS_KEY")}
    env["AWS_EC2_METADATA_DISABLED"] = "true"  # no instance metadata to find credentials in
    no_keys = {k: "" for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                               "AWS_SESSION_TOKEN")}
    r = run_train([*TINY, "--checkpoint-dir", s3.uri("run")], env={**env, **no_keys})
    assert r.returncode == exitcodes.INVALID, r.stderr[-3000:]
    assert f"error: --checkpoint-dir {s3.uri('run')}: no S3 credentials found for " in r.stderr
    assert "(NoCredentialsError): set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY" in r.stderr
    assert "retry 1/" not in r.stderr and "Traceback" not in r.stderr


# ---------------------------------------------------------------------------- 7. disk full
@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs (a real ENOSPC) where mounting is permitted (root with CAP_SYS_ADMIN);
    elsewhere, or with FTT_TEST_DISKFULL=hook, a folder whose writes a sitecustomize hook
    (tests/harness/diskfull/) turns into ENOSPC past a byte budget. Yields (folder, fill, env):
    fill(free_bytes) leaves that much space for a run given ``env``."""
    folder = tmp_path / "disk"
    folder.mkdir()
    env: dict[str, str] = {}
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(folder)],
                             capture_output=True).returncode == 0 \
        if os.environ.get("FTT_TEST_DISKFULL") != "hook" else False

    def fill(free_bytes: int) -> None:
        if mounted:
            st = os.statvfs(folder)
            with open(folder / "filler", "wb") as fh:
                fh.write(b"\0" * (st.f_bavail * st.f_frsize - free_bytes))
        else:
            env.update(FTT_TEST_DISK=str(folder), FTT_TEST_DISK_FREE_BYTES=str(free_bytes),
                       PYTHONPATH=os.pathsep.join([str(ROOT / "tests" / "harness" / "diskfull"),
                                                   str(ROOT), str(ROOT / "src")]))

    try:
        yield folder, fill, env
    finally:
        if mounted:
            subprocess.run(["umount", str(folder)], check=True)


def test_disk_full_while_saving_keeps_the_previous_checkpoint(small_disk):
    folder, fill, env = small_disk
    d = folder / "ckpt"
    r = run_train([*TINY, "--checkpoint-dir", str(d), "--max-steps", "4"])
    assert r.returncode == 0, r.stderr[-3000:]
    before = fingerprint(d / D4)
    fill(16 * 1024)  # room for the write probe, not for a 54 KiB checkpoint

    r = run_train([*TINY, "--checkpoint-dir", str(d), "--save-every-steps", "1",
                   "--max-failed-saves", "2"], env=env)
    assert r.returncode == exitcodes.STORAGE_FAILED, r.stderr[-3000:]
    assert exitcodes.is_retryable(r.returncode)
    assert f"resumed from {d}/{D4}" in r.stderr
    # Reported, naming the folder and what to do; a periodic save's failure does not stop the
    # run, the max-failed-saves-th in a row does (exit 140, retryable:
    # docs/operations/preemption.md). (Which steps fail depends on timing: a save due while one
    # persists may be superseded.)
    full = (rf"StorageError: write {re.escape(str(d))}/step_\d{{10}}/state-\w+\.bin: the disk "
            rf"holding {re.escape(str(d))} is full \(No space left on device\): free space "
            r"there, or use another folder")
    assert re.search(rf"SAVE FAILED for {re.escape(str(d))}/step_\d{{10}} \(1 in a row\): "
                     + full, r.stderr), r.stderr
    assert re.search(r"SAVE FAILED for .* \(2 in a row\): " + full, r.stderr), r.stderr
    assert "exiting with 140 (retryable)" in r.stderr
    assert "Traceback" not in r.stderr
    # The previous checkpoint is intact, nothing partial looks committed, no temp file is left.
    assert committed_steps(d) == [4]
    assert fingerprint(d / D4) == before
    v = ckpt("verify", str(d / D4))
    assert v.returncode == 0 and v.stdout.startswith("valid"), v.stdout + v.stderr
    assert not [p for p in d.rglob("*") if ".tmp-" in p.name]

    # With room again, the same command resumes from it and finishes.
    (folder / "filler").unlink(missing_ok=True)
    r = run_train([*TINY, "--checkpoint-dir", str(d), "--save-every-steps", "4"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resumed from {d}/{D4}" in r.stderr and committed_steps(d) == [4, 8]


# ---------------------------------------------------------------------------- 8. secrets
def test_a_known_secret_appears_nowhere(s3, fault_proxy, tmp_path, monkeypatch, caplog):
    """A run with a known secret against S3 that fails now and then (so that errors are
    logged and retried): the secret is in no log line, in no checkpoint object, in no local
    file the run wrote and in no exception storage raises. The run has it in
    AWS_SECRET_ACCESS_KEY and in --storage-options (which win, and which the run records in
    every checkpoint's configuration: redacted); this process has it in the variable alone."""
    secret = "sEcReT8-" + os.urandom(16).hex()
    fault_proxy.set_faults(Fault("503", method="PUT", every=3), Fault("500", method="GET",
                                                                      every=4))
    local = tmp_path / "local"
    options = {"key": "AKIDSECRETTEST", "secret": secret, "endpoint_url": fault_proxy.url}
    env = {**s3.env, "AWS_ENDPOINT_URL": fault_proxy.url, "AWS_SECRET_ACCESS_KEY": secret,
           "FTT_EXIT_CODE_DIR": str(local / "codes"), "FTT_LOG_LEVEL": "DEBUG"}
    # Every outlet of a running job is searched too: JSON log lines, the metrics endpoint (
    # scraped while it trains), TensorBoard event files and the heartbeat file.
    port = free_port()
    log_path = local / "run.log"
    local.mkdir(parents=True)
    proc = start_train([*TINY, "--epochs", "6", "--log-every-steps", "1",
                        "--checkpoint-dir", s3.uri("run"), "--save-every-steps", "2",
                        "--storage-options", json.dumps(options),
                        "--trace-samples", str(local / "trace"), "--log-format", "json",
                        "--metrics-port", str(port), "--tensorboard", str(local / "tb"),
                        "--heartbeat-file", str(local / "heartbeat")], env=env,
                       log_path=log_path)
    scrapes = []
    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    while proc.poll() is None:
        try:
            with direct.open(f"http://127.0.0.1:{port}/metrics", timeout=2) as resp:
                scrapes.append(resp.read().decode())
        except OSError:
            pass
        time.sleep(0.02)
    output = log_path.read_text()
    assert proc.wait() == 0, output[-3000:]
    r = subprocess.CompletedProcess(proc.args, 0, output, "")
    assert scrapes and "ftrain_step" in scrapes[-1], output[-2000:]
    assert list((local / "tb").glob("events.out.tfevents.*"))
    assert "retry 1/" in output  # errors were logged, as events too
    assert logs.storage_retries(output) >= 1
    assert all({"what", "attempt", "delay_s"} <= set(e) for e in logs.events(output, "retry"))
    assert s3.committed("run")
    objects = {key: s3.read(key) for key in s3.keys("run/")}

    # The secret in this process's environment: the exceptions storage raises, and the log.
    monkeypatch.setenv("AWS_ENDPOINT_URL", fault_proxy.url)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    errors: list[BaseException] = []
    with caplog.at_level(logging.DEBUG):
        for action in ("503", "500", "403"):
            fault_proxy.set_faults(Fault(action))
            with pytest.raises(StorageError) as err:
                Storage(s3.uri("run")).read(next(iter(objects)).split("/", 1)[1])
            errors.append(err.value)
    searched = assert_secret_absent(secret, texts=[r.stdout, caplog.text, *scrapes],
                                    paths=[local], blobs=objects, exceptions=errors)
    assert searched >= len(objects) + 3
