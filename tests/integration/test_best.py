"""--keep-best and early stopping across real SIGKILLs: a run killed twice (each time after it
trained past a step whose checkpoint it never committed), then resumed, keeps
the same checkpoints, stops at the same step for the same reason, and ends with the same weights
and history as an uninterrupted run; ``ckpt ls`` marks the best, ``export`` and ``predict`` take
ROOT/best."""

from __future__ import annotations

import json
import signal
import subprocess

import pytest

from ftrain.checkpoint import load_uri, step_dirname
from tests.harness.checkpoints import assert_bitwise_equal, committed_steps, strip_timing
from tests.harness.processes import (
    PY,
    base_env,
    ckpt,
    kill_group,
    kill_leftovers,
    run_train,
    start_train,
    wait_for,
)
from tests.harness.stores import held_commit_env

pytestmark = pytest.mark.slow

ARGS = ["--model", "mlp", "--synthetic-train-size", "2048", "--batch-size", "64",
        "--epochs", "10", "--lr", "0.01", "--eval-every-steps", "4", "--log-every-steps", "0",
        "--save-every-seconds", "0", "--keep-last", "2", "--keep-best", "2",
        "--best-metric", "eval_loss", "--early-stop-patience", "3"]


def _train_state(folder) -> dict:
    ts = load_uri(str(folder)).train_state
    return {"history": strip_timing(ts["history"]), "evals": ts["evals"],
            "stopped": ts.get("stopped"), "step": ts["step"]}


def _killed_after_training(args, nproc, held_step, tmp_path, n) -> None:
    """Train with the commit of ``held_step`` held for ever; SIGKILL the whole job once it is
    held (the step trained, its checkpoint never committed)."""
    mark = tmp_path / f"held-{n}"
    log = tmp_path / f"attempt-{n}.log"
    proc = start_train(args, nproc=nproc, env=held_commit_env(step_dirname(held_step), mark),
                       log_path=log)
    try:
        assert wait_for(mark.exists, 240, while_=lambda: proc.poll() is None), log.read_text()
        kill_group(proc, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        kill_leftovers(str(tmp_path))
    assert held_step not in committed_steps(args[args.index("--checkpoint-dir") + 1])


def test_keep_best_and_early_stopping_survive_two_sigkills(tmp_path):
    ref, run = tmp_path / "ref", tmp_path / "run"
    r = run_train([*ARGS, "--checkpoint-dir", str(ref)], nproc=2)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "stopping early at step" in r.stderr, r.stderr[-3000:]
    want = _train_state(ref)
    stop = want["stopped"]
    assert stop["reason"] == "early_stop" and stop["evaluations_since_best"] == 3
    assert want["step"] < 10 * 32  # it stopped before --epochs
    kept = committed_steps(ref)
    # The newest 2, and the 2 best besides; the best is among them.
    assert len(kept) <= 4 and stop["best_step"] in kept, kept
    assert load_uri(str(ref / step_dirname(want["step"]))).manifest.reason == "early_stop"

    args = [*ARGS, "--checkpoint-dir", str(run)]
    # Killed before the best was reached, then inside the patience window (after the best);
    # each time the steps after the newest commit are trained again. (The same world size:
    # another one continues the same samples, not the same bits; docs/design/exact-resume.md.)
    first, second = stop["best_step"] - 24, want["step"] - 4
    assert 0 < first < stop["best_step"] < second, (first, stop, second)
    _killed_after_training(args, 2, first, tmp_path, 1)
    _killed_after_training(args, 2, second, tmp_path, 2)
    r = run_train(args, nproc=2)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stderr and "stopping early at step" in r.stderr
    assert committed_steps(run) == kept
    assert _train_state(run) == want
    for step in kept:
        assert_bitwise_equal(load_uri(str(ref / step_dirname(step))).model_state(),
                             load_uri(str(run / step_dirname(step))).model_state())

    # The same command again: training is over, nothing changes.
    r = run_train(args, nproc=2)
    assert r.returncode == 0 and "training already stopped early" in r.stderr, r.stderr[-3000:]
    assert committed_steps(run) == kept

    # The tools name the best.
    listed = ckpt("ls", str(run)).stdout
    best_line = next(line for line in listed.splitlines() if line.rstrip().endswith(")")
                     and " best (" in line)
    assert step_dirname(stop["best_step"]) in best_line, listed
    out = ckpt("export", str(run / "best"), str(tmp_path / "best.pth"))
    assert out.returncode == 0 and f"step {stop['best_step']})" in out.stdout, out.stderr
    inspected = json.loads(ckpt("inspect", str(run / "best"), "--json").stdout)
    assert inspected["step"] == stop["best_step"]
    r = subprocess.run([PY, "-m", "ftrain.predict", "--checkpoint", str(run / "best"),
                        "--limit", "8", "--show", "0"], env=base_env(), text=True,
                       capture_output=True, timeout=120)
    assert r.returncode == 0 and f"(step {stop['best_step']})" in r.stdout, r.stderr[-2000:]


def test_best_metric_that_no_evaluation_records_is_refused(tmp_path):
    r = run_train(["--model", "mlp", "--synthetic-train-size", "256", "--batch-size", "64",
                   "--epochs", "1", "--best-metric", "eval_f1", "--best-mode", "max",
                   "--checkpoint-dir", str(tmp_path / "c")])
    assert r.returncode == 2, r.stderr[-3000:]
    assert "--best-metric eval_f1: the evaluation recorded no such metric; it has eval_acc, " \
           "eval_loss" in r.stderr


def test_a_run_without_best_metric_has_no_best(tmp_path):
    r = run_train(["--model", "mlp", "--synthetic-train-size", "256", "--batch-size", "64",
                   "--epochs", "1", "--checkpoint-dir", str(tmp_path / "c")])
    assert r.returncode == 0, r.stderr[-3000:]
    out = ckpt("export", str(tmp_path / "c" / "best"), str(tmp_path / "x.pth"))
    assert out.returncode != 0 and "no --best-metric" in out.stdout + out.stderr
