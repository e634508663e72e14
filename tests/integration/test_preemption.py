"""Preemption: SIGTERM to the launcher (what Kubernetes sends) or to one worker. All ranks agree
at the next step boundary, rank 0 writes an emergency checkpoint within --preemption-deadline,
every process exits retryable (143), and the rerun loses no completed step."""

from __future__ import annotations

import os
import signal

import pytest

from tests.harness.checkpoints import committed_steps, latest
from tests.harness.logs import torchrun_failures
from tests.harness.processes import (
    SMALL,
    kill_leftovers,
    launch_run_cmd,
    run_train,
    start_logged,
    train_cmd,
    wait_for,
)
from tests.harness.s3 import Fault
from tests.harness.traces import last_step, read_trace, steps_once_per_rank, trace_pids

pytestmark = pytest.mark.slow

ARGS = [*SMALL, "--epochs", "3"]  # 96 steps: the signal lands well before the end
TOTAL_STEPS = 96


def check_resume_loses_no_step(args: list[str], first: list[dict], stopped_at: int,
                               trace2, nproc: int = 2) -> None:
    """Rerun the same command: it resumes at the emergency checkpoint's step and every step
    is trained exactly once per rank across both runs."""
    r = run_train([*args, "--trace-samples", str(trace2)], nproc=nproc)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"step_{stopped_at:010d}" in r.stderr and "resumed from" in r.stderr
    second = read_trace(trace2)
    assert min(x["step"] for x in second) == stopped_at + 1
    for rank, steps in steps_once_per_rank(first + second).items():
        assert steps == list(range(1, TOTAL_STEPS + 1)), f"rank {rank}: steps lost or repeated"


def test_sigterm_to_launcher(tmp_path):
    """The container entrypoint gets SIGTERM; torchrun forwards it to every worker's process
    group (DataLoader workers included: --num-workers 1)."""
    d, trace1 = tmp_path / "ckpt", tmp_path / "trace1"
    args = [*ARGS, "--num-workers", "1", "--checkpoint-dir", str(d)]
    log = tmp_path / "run1.log"
    proc = start_logged(launch_run_cmd([*args, "--trace-samples", str(trace1)], nproc=2), log)
    try:
        assert wait_for(lambda: len(read_trace(trace1)) >= 4, timeout=180), log.read_text()
        proc.send_signal(signal.SIGTERM)  # the wrapper alone, as Kubernetes signals PID 1
        code = proc.wait(timeout=180)
    finally:
        kill_leftovers(str(tmp_path))
    text = log.read_text()
    assert code == 143, text[-3000:]
    # torchrun's own exit says nothing about the workers; the wrapper's records do.
    assert "torchrun exited 1" in text and "rank 0: 143, rank 1: 143" in text, text[-3000:]
    first = read_trace(trace1)
    stopped_at = last_step(first)
    assert stopped_at < TOTAL_STEPS
    # The emergency checkpoint is at the last step any rank completed.
    assert committed_steps(d)[-1] == stopped_at
    assert latest(d).train_state["step"] == stopped_at
    assert "DataLoader worker" not in text
    check_resume_loses_no_step(args, first, stopped_at, tmp_path / "trace2")


def test_sigterm_to_one_worker(tmp_path):
    """Rank 1 alone gets SIGTERM: rank 0 learns it through the step agreement, checkpoints,
    and both exit 143. torchrun reports rank 1's 143 as the root cause and exits 1 itself."""
    d, trace1 = tmp_path / "ckpt", tmp_path / "trace1"
    args = [*ARGS, "--checkpoint-dir", str(d)]
    log = tmp_path / "run1.log"
    proc = start_logged(launch_run_cmd([*args, "--trace-samples", str(trace1)], nproc=2), log)
    try:
        assert wait_for(lambda: len(read_trace(trace1)) >= 4, timeout=180), log.read_text()
        os.kill(trace_pids(trace1)[1], signal.SIGTERM)
        code = proc.wait(timeout=180)
    finally:
        kill_leftovers(str(tmp_path))
    text = log.read_text()
    assert code == 143, text[-3000:]
    assert torchrun_failures(text)[1] == 143, text[-3000:]
    # (torchrun SIGTERMs rank 0 once rank 1 has exited: that one may show as -15 there.)
    assert "torchrun exited 1" in text and "rank 0: 143, rank 1: 143" in text, text[-3000:]
    assert "[rank 1] WARNING received SIGTERM" in text
    rank0_signal = text.find("[rank 0] WARNING received SIGTERM")
    assert rank0_signal == -1 or rank0_signal > text.index("stopped at step")
    first = read_trace(trace1)
    stopped_at = last_step(first)  # both ranks stopped at the same step
    assert committed_steps(d)[-1] == stopped_at
    check_resume_loses_no_step(args, first, stopped_at, tmp_path / "trace2")


def test_emergency_checkpoint_respects_the_deadline(tmp_path, s3, fault_proxy):
    """S3 stops answering uploads during the emergency save: past --preemption-deadline the
    process says so loudly and exits 143 anyway; the unfinished checkpoint stays invisible."""
    trace, log = tmp_path / "trace", tmp_path / "run.log"
    args = [*ARGS, "--checkpoint-dir", s3.uri("run"), "--preemption-deadline", "2",
            "--trace-samples", str(trace)]
    proc = start_logged(train_cmd(args), log, env=dict(s3.env, AWS_ENDPOINT_URL=fault_proxy.url))
    try:
        assert wait_for(lambda: len(read_trace(trace)) >= 2, timeout=120), log.read_text()
        fault_proxy.set_faults(Fault("slow", method="PUT", delay=90))  # uploads hang
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=120)
    finally:
        fault_proxy.set_faults()
        kill_leftovers(str(tmp_path))
    text = log.read_text()
    assert code == 143, text[-3000:]
    assert "MISSED --preemption-deadline 2s" in text, text[-3000:]
    # It left then: before the abandoned upload's retries ran out (30 s later, as they did
    # while the process still waited for the write it had given up).
    assert "SAVE FAILED" not in text and "retry 1/" not in text, text[-3000:]
    assert fault_proxy.injected().get("slow", 0) >= 1
    stopped_at = last_step(read_trace(trace))
    assert f"run/step_{stopped_at:010d}/manifest.json" not in s3.keys("run/")
