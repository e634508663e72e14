"""Exact resume under real kills.

The whole job (torchrun and every worker) is SIGKILLed mid-epoch, during evaluation and inside
a save; the same command then runs to the end, and its final weights, metric history and
sample sequence must equal those of one uninterrupted run, bit for bit. The number of
DataLoader workers must not change a bit either (augmentation seeded per sample:
tests/unit/test_augmentation.py), and every rank checks that all resumed at the same step.
"""

from __future__ import annotations

import multiprocessing
import os
import random
import signal
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from ftrain.runtime.distributed import Collectives, DistInfo
from tests.harness import chaos, logs
from tests.harness.checkpoints import (
    assert_bitwise_equal,
    committed_steps,
    half_written,
    latest,
    latest_committed,
    strip_timing,
)
from tests.harness.processes import run_train
from tests.harness.stores import PAUSE_ENV, die_after_env

NPROC = 2
# launch.chaos's default training flags for a short run (2 epochs of 32 steps, a step
# checkpoint every 3 steps): tests/system/test_chaos.py's CI run reuses the same reference run.
TRAIN_ARGS = chaos.effective_train_args([], kills=4)


@pytest.fixture(scope="session")
def reference(tmp_path_factory) -> chaos.Reference:
    return chaos.shared_reference(tmp_path_factory, NPROC, TRAIN_ARGS)


def start_job(tmp_path: Path, name: str, extra: tuple[str, ...] = (),
              env: dict | None = None) -> chaos.Job:
    return chaos.Job(NPROC, [*TRAIN_ARGS, *extra], tmp_path / "ckpt", tmp_path / name / "trace",
                     tmp_path / name / "log.txt", env).start()


def kill_whole_job(job: chaos.Job) -> None:
    job.kill(signal.SIGKILL, "launcher", random.Random(0))
    assert job.wait(60) is not None
    assert job.reap(30) == 0


def resume_and_compare(reference: chaos.Reference, tmp_path: Path, killed: chaos.Job) -> chaos.Job:
    """Run the same command to the end; assert it ends exactly as the reference did."""
    job = chaos.Job(NPROC, TRAIN_ARGS, tmp_path / "ckpt", tmp_path / "resumed" / "trace",
                    tmp_path / "resumed" / "log.txt")
    assert chaos.run_to_end(job, timeout=300) == 0, job.log_text()[-3000:]
    verdict = chaos.compare_runs(reference, tmp_path / "ckpt", [killed.trace_dir, job.trace_dir])
    assert not verdict["problems"], verdict
    return job


@pytest.mark.slow
def test_sigkill_mid_epoch_resumes_exactly(reference, tmp_path):
    job = start_job(tmp_path, "killed")
    # At a random moment after the first step checkpoint has committed.
    assert job.wait_until(lambda: latest_committed(tmp_path / "ckpt") > 0, 120), \
        job.log_text()[-3000:]
    job.sleep(random.uniform(0.0, 0.4))
    kill_whole_job(job)
    resume_at = latest_committed(tmp_path / "ckpt")
    assert resume_at % reference.steps_per_epoch, "the kill should land mid-epoch"
    assert max(job.trained_steps()) >= resume_at
    resumed = resume_and_compare(reference, tmp_path, job)
    assert logs.resumed(resumed.log_text())["batch_in_epoch"] == resume_at


@pytest.mark.slow
def test_sigkill_during_evaluation_resumes_exactly(reference, tmp_path):
    job = start_job(tmp_path, "killed")
    # Rank 0 has trained the last batch of epoch 1: the evaluation follows.
    assert job.wait_until(lambda: job.epoch_ended(reference.steps_per_epoch) is not None, 120), \
        job.log_text()[-3000:]
    kill_whole_job(job)
    assert not logs.epoch_done(job.log_text(), 1), "the kill came after the evaluation"
    assert reference.steps_per_epoch not in committed_steps(tmp_path / "ckpt")
    resume_and_compare(reference, tmp_path, job)


@pytest.mark.slow
def test_sigkill_inside_a_save_resumes_exactly(reference, tmp_path):
    # The test-only pause holds the first step checkpoint with its data files written and no
    # manifest: the kill leaves a half-written checkpoint and nothing committed. (The rerun
    # used to refuse to start, exit 2: "holds checkpoints but none is valid".)
    job = start_job(tmp_path, "killed", env={PAUSE_ENV: "30"})
    assert job.wait_until(lambda: bool(half_written(tmp_path / "ckpt")), 120), \
        job.log_text()[-3000:]
    kill_whole_job(job)
    assert half_written(tmp_path / "ckpt")
    assert committed_steps(tmp_path / "ckpt") == []
    resume_and_compare(reference, tmp_path, job)


@pytest.mark.slow
def test_dataloader_workers_do_not_change_the_weights(reference, tmp_path):
    job = start_job(tmp_path, "workers2", ("--num-workers", "2"))
    assert job.wait(300) == 0, job.log_text()[-3000:]
    job.reap()
    verdict = chaos.compare_runs(reference, tmp_path / "ckpt", [job.trace_dir])
    assert not verdict["problems"], verdict


def _check_resumed_step(rank: int, steps: list[int], store: str, out) -> None:
    dist.init_process_group("gloo", store=dist.FileStore(store, 2), rank=rank, world_size=2)
    coll = Collectives(DistInfo(rank, 2, rank, torch.device("cpu"), "gloo"))
    out.put((rank, coll.all_equal(steps[0]), coll.all_equal(steps[rank])))
    dist.destroy_process_group()


def test_every_rank_checks_that_all_resumed_at_the_same_step(tmp_path):
    # train.py refuses to go on (exit 2) when Collectives.all_equal(step) is False on any rank.
    ctx = multiprocessing.get_context("fork")
    results = ctx.Queue()
    procs = [ctx.Process(target=_check_resumed_step,
                         args=(r, [40, 41], str(tmp_path / "store"), results)) for r in (0, 1)]
    for p in procs:
        p.start()
    got = sorted(results.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(30)
    assert got == [(0, True, False), (1, True, False)]


def _kill_rank(job: chaos.Job, rank: int, after_steps: int) -> int:
    """SIGKILL one worker (by rank) at a random moment after rank 0 has trained
    ``after_steps`` steps in this launch; returns the newest step any rank had trained then."""
    assert job.wait_until(lambda: job.steps_done() >= after_steps, 120), job.log_text()[-3000:]
    job.sleep(random.uniform(0.0, 0.3))
    pid = next(int(p.name.split("-pid")[1].split(".")[0])
               for p in job.trace_dir.glob(f"rank{rank}-pid*.jsonl"))
    trained = max(job.trained_steps())
    os.kill(pid, signal.SIGKILL)
    assert job.wait(120) is not None
    assert job.reap(30) == 0
    return trained


@pytest.mark.slow
def test_a_sigkilled_worker_costs_at_most_the_step_in_flight(reference, tmp_path):
    """One worker SIGKILLed (no warning, no emergency checkpoint of its own): the survivor
    checkpoints the newest step it completed, which every rank's gradients went into, without
    any collective, and exits 141 (retryable). First rank 1 dies (rank 0 survives), then, in
    the rerun, rank 0 (rank 1 survives and writes for it). Each kill loses at most the step in
    flight, and the run ends bitwise equal to the uninterrupted one, history included."""
    ckpt = tmp_path / "ckpt"
    killed = []
    for victim, after in ((1, 9), (0, 6)):
        job = start_job(tmp_path, f"kill-rank{victim}")
        killed.append(job)
        newest = _kill_rank(job, victim, after)
        text = job.log_text()
        saved = list(logs.events(text, "survivor_checkpoint"))
        assert saved, text[-3000:]
        survivor = 1 - victim
        assert {e["rank"] for e in saved} == {survivor}, saved
        assert logs.worker_exits(text).count(141) == 1, text[-3000:]
        committed = latest_committed(ckpt)
        lost = sorted(s for s in job.trained_steps() if s > committed)
        assert len(lost) <= 1 and committed >= newest - 1, (lost, committed, newest)
    job = chaos.Job(NPROC, TRAIN_ARGS, ckpt, tmp_path / "resumed" / "trace",
                    tmp_path / "resumed" / "log.txt")
    assert chaos.run_to_end(job, timeout=300) == 0, job.log_text()[-3000:]
    verdict = chaos.compare_runs(reference, ckpt, [*(k.trace_dir for k in killed), job.trace_dir])
    assert not verdict["problems"], verdict


@pytest.mark.slow
def test_a_worker_killed_in_an_evaluation_inside_the_epoch_costs_no_step(tmp_path):
    """Rank 1 dies as the evaluation after step 6 begins (--eval-every-steps 3, 8 steps an
    epoch, a save every 4 steps): the survivor checkpoints step 6, whose evaluation did not
    finish (it used to fall back to step 4's commit), and the rerun evaluates step 6 before it
    trains step 7. Weights, history and the evaluations inside the epochs end as in an
    uninterrupted run."""
    args = ["--task", "tests.harness.ported:SumTask", "--batch-size", "32", "--epochs", "3",
            "--log-every-steps", "0", "--save-every-seconds", "0", "--lr", "0.1",
            "--eval-every-steps", "3", "--save-every-steps", "4", "--log-format", "json"]
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    r = run_train([*args, "--checkpoint-dir", str(ref)], nproc=NPROC)
    assert r.returncode == 0, r.stderr[-3000:]
    r = run_train([*args, "--checkpoint-dir", str(cut)], nproc=NPROC,
                  env=die_after_env(1, in_eval_step=6))
    assert r.returncode != 0, r.stderr[-3000:]
    saved = [(e["rank"], e["step"]) for e in logs.events(r.stderr, "survivor_checkpoint")]
    assert saved == [(0, 6)], r.stderr[-3000:]
    assert 141 in logs.worker_exits(r.stderr), r.stderr[-3000:]
    assert latest_committed(cut) == 6
    assert [e["step"] for e in latest(cut).train_state["evals"]] == [3]  # 6's never finished
    r = run_train([*args, "--checkpoint-dir", str(cut)], nproc=NPROC)
    assert r.returncode == 0, r.stderr[-3000:]
    assert logs.resumed(r.stderr)["step"] == 6, r.stderr[-3000:]
    a, b = latest(ref), latest(cut)
    assert_bitwise_equal(a.state["model"], b.state["model"])
    assert strip_timing(a.train_state["history"]) == strip_timing(b.train_state["history"])
    assert [e["step"] for e in a.train_state["evals"]] == [3, 6, 9, 12, 15, 18, 21]
    assert strip_timing(a.train_state["evals"]) == strip_timing(b.train_state["evals"])
