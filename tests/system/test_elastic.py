"""Elastic restarts under torchrun.

- ``--max-restarts``: a SIGKILLed worker makes torchrun restart the group, which resumes from the
  newest checkpoint and ends bitwise-identical to an uninterrupted run.
- Two torchrun agents on this machine as two "nodes" (``--nnodes 1:2``, c10d rendezvous on
  loopback): one agent dies, or a whole node (the agent and its worker); the other
  re-rendezvouses alone (world size 1) and finishes from the newest checkpoint, which the
  survivor wrote itself when the node was lost.
"""

from __future__ import annotations

import os
import re
import signal

import pytest

from ftrain.runtime import exitcodes
from tests.harness.checkpoints import assert_bitwise_equal, committed_steps, latest, strip_timing
from tests.harness.processes import (
    PY,
    SMALL,
    children,
    free_port,
    kill_leftovers,
    run_train,
    start_logged,
    start_train,
    wait_for,
)
from tests.harness.traces import read_trace, steps_once_per_rank, trace_pids

pytestmark = pytest.mark.slow


@pytest.mark.extended  # a second case: docs/development/testing.md
def test_max_restarts_after_sigkilled_worker_is_bitwise_exact(tmp_path):
    ref = tmp_path / "ref"
    r = run_train([*SMALL, "--checkpoint-dir", str(ref)], nproc=2)
    assert r.returncode == 0, r.stderr[-3000:]

    d, trace, log = tmp_path / "ckpt", tmp_path / "trace", tmp_path / "run.log"
    proc = start_train([*SMALL, "--checkpoint-dir", str(d), "--save-every-steps", "5",
                        "--trace-samples", str(trace)], nproc=2,
                       torchrun_args=["--max-restarts", "2"], log_path=log)
    try:
        assert wait_for(lambda: committed_steps(d), timeout=180), log.read_text()
        victim = trace_pids(trace)[1]
        os.kill(victim, signal.SIGKILL)
        code = proc.wait(timeout=240)
    finally:
        kill_leftovers(str(tmp_path))
    text = log.read_text()
    assert code == 0, text[-4000:]
    # torchrun names the first failure it sees: the killed rank 1 (-9), or rank 0 when it
    # meets the dead peer in a collective and exits 141 first (as fast as rank 1's death is
    # noticed, since workers exit without the interpreter's teardown).
    first = re.findall(r"failed \(exitcode: (-?\d+)\) local_rank: (\d+)", text)
    assert first and first[0] in {("-9", "1"), (str(exitcodes.PEER_FAILED), "0")}, text[-4000:]
    assert "resumed from" in text, text[-4000:]
    assert trace_pids(trace)[1] != victim  # rank 1 was restarted
    got, want = latest(d), latest(ref)
    assert got.manifest.step == want.manifest.step == 64
    assert_bitwise_equal(got.state["model"], want.state["model"])
    assert strip_timing(got.train_state["history"]) == strip_timing(want.train_state["history"])


def agent_cmd(port: int, is_host: bool, args: list[str]) -> list[str]:
    """One torchrun agent with one worker, as one node of a 1-to-2-node job."""
    conf = (f"is_host={int(is_host)},last_call_timeout=2,keep_alive_interval=1,"
            "keep_alive_max_attempt=3")
    return [PY, "-m", "torch.distributed.run", "--nnodes", "1:2", "--nproc_per_node", "1",
            "--max-restarts", "3", "--rdzv-backend", "c10d", "--rdzv-endpoint",
            f"127.0.0.1:{port}", "--rdzv-id", "two-nodes", "--rdzv-conf", conf,
            "-m", "src.train", *args]


@pytest.mark.parametrize("loss", [pytest.param("agent", marks=pytest.mark.extended), "node"])
def test_two_agents_one_dies_the_other_finishes_alone(tmp_path, loss):
    """``agent``: SIGKILL to the agent's process group; its worker (a session of its own) gets
    SIGTERM as its launcher dies, so rank 0 writes an emergency checkpoint and no step is lost.
    ``node``: the agent and its worker SIGKILLed together; the surviving worker meets the dead
    peer in a collective and checkpoints the newest step it completed (runtime/exchange.py),
    so its agent resumes on world size 1 losing at most the step in flight."""
    d, trace = tmp_path / "ckpt", tmp_path / "trace"
    args = [*SMALL, "--checkpoint-dir", str(d), "--save-every-steps", "4",
            "--trace-samples", str(trace)]
    # The survivor must not need TORCH_DISABLE_SHARE_RDZV_TCP_STORE (ftrain-run sets it).
    env = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "0"}
    port = free_port()
    a = start_logged(agent_cmd(port, True, args), tmp_path / "a.log", env=env)
    b = start_logged(agent_cmd(port, False, args), tmp_path / "b.log", env=env)
    try:
        assert wait_for(lambda: committed_steps(d) and len(trace_pids(trace)) == 2,
                        timeout=180), (tmp_path / "a.log").read_text()
        b_workers = children(b.pid)
        os.killpg(b.pid, signal.SIGKILL)
        if loss == "node":
            for pid in b_workers:
                os.kill(pid, signal.SIGKILL)
        assert b.wait(timeout=60) == -signal.SIGKILL
        code = a.wait(timeout=240)
    finally:
        kill_leftovers(str(tmp_path))
    text = (tmp_path / "a.log").read_text()
    assert code == 0, text[-4000:]
    assert "allowed change: world size 2 -> 1" in text
    lines = read_trace(trace)
    before = [x for x in lines if x["world"] == 2]
    after = [x for x in lines if x["world"] == 1]
    assert {x["rank"] for x in before} == {0, 1} and {x["rank"] for x in after} == {0}
    resumed = min(x["step"] for x in after) - 1
    assert f"step_{resumed:010d}" in text  # the newest checkpoint when the survivor restarted
    assert max(x["step"] for x in after) == 64
    steps_once_per_rank(after)
    if loss == "node":  # the survivor's checkpoint: at most the step in flight lost
        assert re.search(r"a peer failed after step \d+: step \d+ checkpointed by this rank",
                         text), text[-4000:]
        assert resumed >= max(x["step"] for x in before) - 1
    if loss == "agent":  # emergency checkpoint: nothing trained twice, nothing skipped
        assert resumed == max(x["step"] for x in before)
        steps = sorted({x["step"] for x in before} | {x["step"] for x in after})
        assert steps == list(range(1, 65))
    final = latest(d)
    assert (final.manifest.step, final.manifest.world_size) == (64, 1)
    assert [h["epoch"] for h in final.train_state["history"]] == [1, 2]
