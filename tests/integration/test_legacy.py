"""Checkpoints written before tasks existed (format 1, SHA-256, no task or run facts recorded;
tests/fixtures/v1-checkpoint was made by commit 1736b32 with the command below) still verify,
inspect, and resume: a resumed run continues it exactly, and ends close to a run of today's code
from step 0 (bitwise only on a machine with the fixture's float kernels).

    python -m src.train --model mlp --width 16 --depth 1 --synthetic-train-size 512 \\
        --synthetic-test-size 128 --batch-size 64 --epochs 2 --max-steps 5 \\
        --save-every-seconds 0 --log-every-steps 0 --checkpoint-dir tests/fixtures/v1-checkpoint
"""

from __future__ import annotations

import shutil

import pytest
import torch

from tests.harness.checkpoints import assert_bitwise_equal, latest, strip_timing
from tests.harness.processes import ROOT, ckpt, inspect, run_train

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
    """The fixture's weights were computed on another machine, whose float kernels (vector
    width, thread count) may differ from this one's in the last bit. So exactness is checked
    from the fixture's own state: a resume cut at step 9 (in the second epoch) and resumed again ends bitwise equal
    to an uninterrupted resume of the fixture. A run of today's code from step 0 on this
    machine ends close to both (within float noise): the old checkpoint's model, optimizer
    and schedule really were restored, not started afresh."""
    once, cut, fresh = tmp_path / "once", tmp_path / "cut", tmp_path / "fresh"
    shutil.copytree(FIXTURE, once)
    shutil.copytree(FIXTURE, cut)
    r = run_train([*ARGS, "--checkpoint-dir", str(once)])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "step 5, batch 5 of epoch 1" in r.stderr and "incompatible" not in r.stderr
    # Written before the numeric environment was recorded: nothing to compare, nothing said.
    assert "numeric environment changed" not in r.stderr, r.stderr[-3000:]
    r = run_train([*ARGS, "--max-steps", "9", "--checkpoint-dir", str(cut)])
    assert r.returncode == 0, r.stderr[-3000:]
    r = run_train([*ARGS, "--checkpoint-dir", str(cut)])
    assert r.returncode == 0 and "step 9, batch 1 of epoch 2" in r.stderr, r.stderr[-3000:]
    r = run_train([*ARGS, "--checkpoint-dir", str(fresh)])
    assert r.returncode == 0, r.stderr[-3000:]
    a, b, c = latest(once), latest(cut), latest(fresh)
    assert a.train_state["step"] == b.train_state["step"] == c.train_state["step"] == 16
    assert_bitwise_equal(a.state["model"], b.state["model"])
    assert strip_timing(a.train_state["history"]) == strip_timing(b.train_state["history"])
    for name, tensor in c.state["model"].items():
        torch.testing.assert_close(a.state["model"][name], tensor, rtol=1e-4, atol=1e-5)
    ha, hc = a.train_state["history"], c.train_state["history"]
    assert [(h["epoch"], h["step"]) for h in ha] == [(h["epoch"], h["step"]) for h in hc]
    for x, y in zip(ha, hc, strict=True):
        for key in ("train_loss", "train_acc", "eval_loss", "eval_acc", "lr"):
            assert x[key] == pytest.approx(y[key], rel=1e-4, abs=1e-4), (key, x, y)
    # A change that the old checkpoint's configuration records is still refused.
    r = run_train([*ARGS, "--epochs", "3", "--seed", "4", "--checkpoint-dir", str(once)])
    assert r.returncode == 2 and "--seed: checkpoint 0, now 4" in r.stderr, r.stderr[-2000:]
