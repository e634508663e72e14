"""Checkpoints written before tasks existed (format 1, SHA-256, no task or run facts recorded;
tests/fixtures/v1-checkpoint was made by commit 1736b32 with the command below) still verify,
inspect, and resume: the resumed run ends bitwise equal to an uninterrupted run of today's code.

    python -m src.train --model mlp --width 16 --depth 1 --synthetic-train-size 512 \\
        --synthetic-test-size 128 --batch-size 64 --epochs 2 --max-steps 5 \\
        --save-every-seconds 0 --log-every-steps 0 --checkpoint-dir tests/fixtures/v1-checkpoint
"""

from __future__ import annotations

import shutil

import pytest

from launch.chaos import strip_timing
from tests.helpers import ROOT, assert_bitwise_equal, ckpt, inspect, run_train
from tests.tracing import latest

pytestmark = pytest.mark.slow

FIXTURE = ROOT / "tests" / "fixtures" / "v1-checkpoint"
ARGS = ["--model", "mlp", "--width", "16", "--depth", "1", "--synthetic-train-size", "512",
        "--synthetic-test-size", "128", "--batch-size", "64", "--epochs", "2",
        "--save-every-seconds", "0", "--log-every-steps", "0"]


def test_v1_checkpoint_verifies_and_inspects():
    r = ckpt("verify", str(FIXTURE))
    assert r.returncode == 0 and "1 valid, 0 invalid" in r.stdout, r.stdout + r.stderr
    info = inspect(str(FIXTURE))
    assert info["step"] == 5 and info["task"] == {
        "import": "ftrain.tasks:ImageClassification",
        "args": {"dataset": "synthetic", "model": "mlp", "width": 16, "depth": 1,
                 "synthetic_train_size": 512, "synthetic_test_size": 128}}


def test_v1_checkpoint_resumes_bitwise(tmp_path):
    old, ref = tmp_path / "old", tmp_path / "ref"
    shutil.copytree(FIXTURE, old)
    r = run_train([*ARGS, "--checkpoint-dir", str(old)])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "step 5, batch 5 of epoch 1" in r.stderr and "incompatible" not in r.stderr
    r = run_train([*ARGS, "--checkpoint-dir", str(ref)])
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = latest(old), latest(ref)
    assert a.train_state["step"] == b.train_state["step"] == 16
    assert_bitwise_equal(a.state["model"], b.state["model"])
    assert strip_timing(a.train_state["history"]) == strip_timing(b.train_state["history"])
    # A change that the old checkpoint's configuration records is still refused.
    r = run_train([*ARGS, "--epochs", "3", "--seed", "4", "--checkpoint-dir", str(old)])
    assert r.returncode == 2 and "--seed: checkpoint 0, now 4" in r.stderr, r.stderr[-2000:]


def test_new_checkpoints_record_the_checksum_algorithm_per_file(tmp_path):
    """Format 2: every file's entry names its algorithm (XXH3-128); a flipped byte fails it,
    and an entry naming an algorithm this build does not know is reported as such."""
    import json

    from ftrain.checkpoint import FORMAT_VERSION, CheckpointStore, CorruptCheckpoint
    from ftrain.storage import Storage
    from tests.s3server import save_checkpoint

    save_checkpoint(str(tmp_path), 3)
    manifest_path = tmp_path / "step_0000000003" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    assert manifest["format_version"] == FORMAT_VERSION == 2
    for meta in manifest["files"].values():
        assert meta["algorithm"] == "xxh3-128" and len(meta["digest"]) == 32
    store = CheckpointStore(Storage(str(tmp_path)))
    store.load("step_0000000003")
    fname = next(iter(manifest["files"]))
    manifest["files"][fname]["algorithm"] = "md4"
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(CorruptCheckpoint, match="unknown checksum algorithm 'md4'"):
        store.load("step_0000000003")
