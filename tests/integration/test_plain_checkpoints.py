"""Plain PyTorch checkpoints in both directions: a plain script's .pth files start a run
(--init-from: a state_dict, or the script's full dict), and ckpt export --format full hands a
run back to a plain script."""

from __future__ import annotations

import subprocess
import textwrap

import pytest
import torch

from tests.harness.checkpoints import latest
from tests.harness.processes import PY, ROOT, base_env, ckpt, inspect, run_train

pytestmark = pytest.mark.slow

ARGS = ["--batch-size", "32", "--log-every-steps", "0", "--save-every-seconds", "0"]
TASK = "tests.harness.ported:EpochStepLR"  # Adadelta and StepLR(1, 0.7), per epoch

# A plain script: the same model, optimizer and schedule as the task, its own loop.
SCRIPT = textwrap.dedent("""
    import sys
    import torch
    from torch import nn
    import torch.nn.functional as F

    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    opt = torch.optim.Adadelta(model.parameters(), lr=1.0)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.7)
    x = torch.randn(256, 16)
    y = x[:, :4].argmax(1)
    mode, path = sys.argv[1], sys.argv[2]
    if mode == "load":  # a checkpoint exported by ftrain, read the plain way
        ck = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(ck["model_state_dict"])
        opt.load_state_dict(ck["optimizer_state_dict"])
        sched.load_state_dict(ck["scheduler_state_dict"])
        print("LOADED epoch", ck["epoch"], "lr", sched.get_last_lr()[0], sorted(ck))
    for epoch in range(2):
        for i in range(0, 256, 32):
            loss = F.cross_entropy(model(x[i:i + 32]), y[i:i + 32])
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
    if mode == "save":
        torch.save({"epoch": 2, "model_state_dict": model.state_dict(),
                    "optimizer_state_dict": opt.state_dict(),
                    "scheduler_state_dict": sched.state_dict(), "loss": loss.item()}, path)
        torch.save(model.state_dict(), path + ".weights")
        torch.save(model, path + ".model")  # a whole pickled model: refused
    print("DONE")
""")


def _script(tmp_path, *args):
    path = tmp_path / "plain_script.py"
    path.write_text(SCRIPT)
    r = subprocess.run([PY, str(path), *args], cwd=ROOT, env=base_env(), capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def test_a_scripts_full_dict_continues_at_the_next_epoch(tmp_path):
    full = tmp_path / "script.pth"
    _script(tmp_path, "save", str(full))
    d = tmp_path / "ckpt"
    r = run_train(["--task", TASK, *ARGS, "--epochs", "4", "--init-from", str(full),
                   "--checkpoint-dir", str(d)])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "training continues at epoch 3" in r.stderr and "not bitwise" in r.stderr
    history = latest(d).train_state["history"]
    assert history[0]["imported"]["loss"] > 0 and history[0]["epoch"] == 2
    assert [h["epoch"] for h in history[1:]] == [3, 4]
    # The schedule went on from the script's: 0.7 ** 2 in epoch 3, 0.7 ** 3 in epoch 4.
    assert [h["lr"] for h in history[1:]] == pytest.approx([0.49, 0.343])
    assert "imported     2 epochs from a plain checkpoint" in ckpt("inspect", str(d)).stdout
    # Resumed with another file: refused; without the flag (or the same file): fine.
    other = tmp_path / "other.pth"
    torch.save({**torch.load(full, weights_only=True), "loss": 9.0}, other)
    r = run_train(["--task", TASK, *ARGS, "--epochs", "5", "--init-from", str(other),
                   "--checkpoint-dir", str(d)])
    assert r.returncode == 2 and "--init-from (the file's digest)" in r.stderr, r.stderr[-2000:]
    r = run_train(["--task", TASK, *ARGS, "--epochs", "5", "--checkpoint-dir", str(d)])
    assert r.returncode == 0, r.stderr[-2000:]


def test_a_state_dict_gives_the_initial_weights(tmp_path):
    full = tmp_path / "script.pth"
    _script(tmp_path, "save", str(full))
    weights = torch.load(str(full) + ".weights", weights_only=True)
    d = tmp_path / "ckpt"
    r = run_train(["--task", "tests.harness.ported:SumTask", *ARGS, "--epochs", "1",
                   "--lr", "1e-12", "--max-steps", "1", "--init-from", str(full) + ".weights",
                   "--checkpoint-dir", str(d)])
    assert r.returncode == 0 and "starting from the weights of --init-from" in r.stderr
    got = latest(d).state["model"]
    for k, v in weights.items():
        torch.testing.assert_close(got[k], v, rtol=0, atol=1e-6)  # one step at lr 1e-12
    assert inspect(str(d))["step"] == 1


def test_a_whole_pickled_model_is_refused(tmp_path):
    full = tmp_path / "script.pth"
    _script(tmp_path, "save", str(full))
    r = run_train(["--task", TASK, *ARGS, "--init-from", str(full) + ".model",
                   "--checkpoint-dir", str(tmp_path / "c")])
    assert r.returncode == 2, r.stderr[-2000:]
    assert "cannot be loaded safely" in r.stderr and "torch.save(model.state_dict()" in r.stderr
    assert "Traceback" not in r.stderr


def test_export_full_is_read_by_a_plain_script(tmp_path):
    d = tmp_path / "ckpt"
    r = run_train(["--task", TASK, *ARGS, "--epochs", "2", "--checkpoint-dir", str(d)])
    assert r.returncode == 0, r.stderr[-2000:]
    out = tmp_path / "export.pth"
    r = ckpt("export", str(d), str(out), "--format", "full")
    assert r.returncode == 0 and "optimizer_state_dict, scheduler_state_dict, epoch 2" in \
        r.stdout, r.stdout + r.stderr
    stdout = _script(tmp_path, "load", str(out))
    assert "LOADED epoch 2 lr 0.48999" in stdout and "DONE" in stdout
    assert "'eval_loss'" in stdout and "'model_state_dict'" in stdout


def test_init_from_under_fsdp_gives_each_rank_its_slices(tmp_path):
    """--parallel fsdp on 2 workers: the plain state_dict's weights end up sharded, each rank
    holding its slices; the checkpoint, assembled whole, is those weights (one step at lr
    1e-12 later)."""
    full = tmp_path / "script.pth"
    _script(tmp_path, "save", str(full))
    weights = torch.load(str(full) + ".weights", weights_only=True)
    d = tmp_path / "ckpt"
    r = run_train(["--task", "tests.harness.ported:SumTask", *ARGS, "--epochs", "1",
                   "--lr", "1e-12", "--max-steps", "1", "--parallel", "fsdp",
                   "--init-from", str(full) + ".weights", "--checkpoint-dir", str(d)], nproc=2)
    assert r.returncode == 0, r.stderr[-3000:]
    got = latest(d).model_state()
    for k, v in weights.items():
        torch.testing.assert_close(got[k], v, rtol=0, atol=1e-6)
