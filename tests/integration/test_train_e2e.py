"""Issue 2 end to end: real torchrun subprocesses on CPU (gloo)."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import pytest
import torch

from ftrain.tasks.builtin.models import build_model
from tests.harness import chaos
from tests.harness.checkpoints import assert_bitwise_equal, committed_steps, strip_timing
from tests.harness.processes import (
    PY,
    ROOT,
    SMALL,
    base_env,
    export_weights,
    inspect,
    kill_group,
    run_train,
    start_train,
    wait_for,
    wait_gone,
)

pytestmark = pytest.mark.slow


# The command of launch.chaos's reference run (2 x 32 steps, a step checkpoint every 3 steps):
# tests/system/test_chaos.py and tests/integration/test_exact_resume.py run the same one, so all share it.
KILL_ARGS = chaos.effective_train_args([], kills=4)


@pytest.fixture(scope="module")
def reference_2w(tmp_path_factory) -> Path:
    """An uninterrupted 2-worker run of the KILL_ARGS job."""
    return chaos.shared_reference(tmp_path_factory, 2, KILL_ARGS).ckpt_dir


def test_full_run_4_workers_rerun_and_continue(tmp_path):
    d = tmp_path / "ckpt"
    r = run_train([*SMALL, "--checkpoint-dir", str(d)], nproc=4)
    assert r.returncode == 0, r.stderr[-3000:]
    # Per-epoch train and eval loss/accuracy on rank 0 only.
    done = [ln for ln in r.stderr.splitlines() if "done: train loss" in ln]
    assert len(done) == 2 and all("[rank 0]" in ln for ln in done)
    assert committed_steps(d) == [32, 64]  # one checkpoint per epoch end
    info = inspect(str(d))
    assert (info["step"], info["epoch"], info["world_size"], info["global_batch_size"],
            info["seed"]) == (64, 2, 4, 64, 0)
    hist = info["history"]
    assert [h["epoch"] for h in hist] == [1, 2]
    assert hist[-1]["eval_acc"] > 0.3  # chance is 0.1
    assert hist[1]["train_loss"] < hist[0]["train_loss"]

    # Same command again: complete, nothing trained, nothing written.
    r = run_train([*SMALL, "--checkpoint-dir", str(d)], nproc=4)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "training already complete" in r.stdout
    assert "done: train loss" not in r.stderr
    assert committed_steps(d) == [32, 64]

    # Raised --epochs continues from where it stopped (and on another world size).
    r = run_train([*SMALL, "--checkpoint-dir", str(d), "--epochs", "3"], nproc=2)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stderr
    hist3 = inspect(str(d))["history"]
    assert [h["epoch"] for h in hist3] == [1, 2, 3]
    assert strip_timing(hist3[:2]) == strip_timing(hist)
    assert hist3[2]["lr"] < hist3[1]["lr"] or hist3[2]["lr"] == 0


def test_sigkill_after_checkpoint_resumes_bitwise(tmp_path, reference_2w):
    d = tmp_path / "ckpt"
    args = [*KILL_ARGS, "--checkpoint-dir", str(d)]
    proc = start_train(args, nproc=2, log_path=tmp_path / "run1.log")
    try:
        # Kill the whole process group once a few mid-epoch checkpoints have committed.
        assert wait_for(lambda: any(s >= 9 for s in committed_steps(d)), timeout=240,
                        interval=0.02)
    finally:
        kill_group(proc, signal.SIGKILL)
        proc.wait()
    # The workers notice their launcher's death (parent-death signal) and stop after an
    # emergency checkpoint; wait for them before restarting.
    assert wait_gone(str(d))
    before = committed_steps(d)
    assert max(before) < 64, "the run finished before it could be killed"
    r = run_train(args, nproc=2)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"step_{max(before):010d}" in r.stderr  # resumed from the newest checkpoint
    got = export_weights(str(d), tmp_path / "got.pth")
    want = export_weights(str(reference_2w), tmp_path / "want.pth")
    assert_bitwise_equal(got, want)
    assert strip_timing(inspect(str(d))["history"]) == strip_timing(
        inspect(str(reference_2w))["history"])


def test_single_process_predict_and_export(tmp_path):
    d = tmp_path / "ckpt"
    r = run_train([*SMALL, "--epochs", "1", "--checkpoint-dir", str(d)], nproc=0)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "single process" in r.stderr
    out = subprocess.run([PY, "-m", "src.predict", "--checkpoint", str(d), "--limit", "50"],
                         cwd=ROOT, env=base_env(), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "accuracy on test" in out.stdout and "/50 =" in out.stdout
    weights = export_weights(str(d), tmp_path / "m.pth")
    model = build_model(inspect(str(d))["model_args"])
    model.load_state_dict(torch.load(tmp_path / "m.pth", map_location="cpu"))
    assert all(v.device.type == "cpu" for v in weights.values())


def test_missing_dataset_is_a_clear_error(tmp_path):
    r = run_train(["--dataset", "fashion-mnist", "--data-dir", str(tmp_path / "nodata"),
                   "--checkpoint-dir", str(tmp_path / "c")], nproc=0)
    assert r.returncode == 2
    assert "--data-dir" in r.stderr and "--download" in r.stderr and "nodata" in r.stderr
    assert "Traceback" not in r.stderr


def test_resume_never_refuses_to_mix_with_existing_checkpoints(tmp_path, reference_2w):
    r = run_train([*KILL_ARGS, "--checkpoint-dir", str(reference_2w), "--resume", "never"],
                  nproc=0)
    assert r.returncode == 2
    assert "--resume never" in r.stderr and "--checkpoint-dir" in r.stderr
