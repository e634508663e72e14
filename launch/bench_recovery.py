"""P6 for the failures the survivors checkpoint (``python -m launch.bench --only p6``): one
worker SIGKILLed under ``torchrun --max-restarts``, and a whole node lost (two torchrun agents
on this machine, c10d rendezvous, one SIGKILLed with its worker). Each: from the kill to the
first step trained after the restart, minus the launcher floor measured in the same run, and
the steps lost (trained before the kill, past the checkpoint the restart resumed from)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

ARGS = ["--synthetic-train-size", "4096", "--batch-size", "64", "--epochs", "3",
        "--save-every-steps", "50", "--save-every-seconds", "0", "--log-every-steps", "0"]


def _rank0_lines(trace: Path) -> dict[str, list[dict]]:
    """Rank 0's trace lines per file (one file per process: a restart starts a new one)."""
    out = {}
    for f in trace.glob("rank0-*.jsonl") if trace.exists() else []:
        out[f.name] = [json.loads(x) for x in f.read_text().splitlines() if x.endswith("}")]
    return out


def _wait(predicate, timeout: float = 300.0) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise TimeoutError("the run did not get there in time")
        time.sleep(0.01)


def _measure(trace: Path, kill, after_steps: int = 12) -> tuple[float, int]:
    """Kill (``kill()``) once rank 0 has trained ``after_steps`` steps; returns the seconds
    from the kill to the first step rank 0 trains after the restart, and the steps lost."""
    _wait(lambda: sum(len(v) for v in _rank0_lines(trace).values()) >= after_steps)
    before = _rank0_lines(trace)
    newest = max(x["step"] for lines in before.values() for x in lines)
    t_kill = time.perf_counter()
    kill()
    _wait(lambda: any(lines for name, lines in _rank0_lines(trace).items()
                      if name not in before))
    seconds = time.perf_counter() - t_kill
    first = min(x["step"] for name, lines in _rank0_lines(trace).items() if name not in before
                for x in lines)
    return seconds, max(0, newest - (first - 1))


def worker_kill(work: Path, py: str, root: Path, env: dict[str, str]) -> tuple[float, int]:
    """Rank 1 of a 2-worker job SIGKILLed; torchrun restarts the group (--max-restarts 1)."""
    trace = work / "p6w-trace"
    cmd = [py, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "--max-restarts", "1", "-m", "ftrain.train", *ARGS,
           "--checkpoint-dir", str(work / "p6w"), "--trace-samples", str(trace)]
    proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        def kill() -> None:
            rank1 = next(trace.glob("rank1-*.jsonl")).name
            os.kill(int(rank1.split("-pid")[1].split(".")[0]), signal.SIGKILL)

        return _measure(trace, kill)
    finally:
        _stop(proc, str(trace))


def node_kill(work: Path, py: str, root: Path, env: dict[str, str]) -> tuple[float, int]:
    """Two agents with one worker each; agent B and its worker SIGKILLed together. Agent A
    re-rendezvouses alone and its worker resumes on world size 1."""
    trace = work / "p6n-trace"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    conf = "last_call_timeout=2,keep_alive_interval=1,keep_alive_max_attempt=3"
    procs = []
    for host in (1, 0):
        cmd = [py, "-m", "torch.distributed.run", "--nnodes", "1:2", "--nproc_per_node", "1",
               "--max-restarts", "3", "--rdzv-backend", "c10d", "--rdzv-endpoint",
               f"127.0.0.1:{port}", "--rdzv-id", "p6-node", "--rdzv-conf",
               f"is_host={host},{conf}", "-m", "ftrain.train", *ARGS,
               "--checkpoint-dir", str(work / "p6n"), "--trace-samples", str(trace)]
        with open(work / f"p6n-agent{1 - host}.log", "w") as log:  # kept for a look
            procs.append(subprocess.Popen(cmd, cwd=root, env=env, stdout=log,
                                          stderr=subprocess.STDOUT, start_new_session=True))
    _wait(lambda: len(list(trace.glob("rank*.jsonl"))) >= 2)
    try:
        def kill() -> None:  # the node of rank 1: its agent and its worker
            b = next(p for p in procs if str(p.pid) in _agent_of_rank1(trace))
            os.killpg(b.pid, signal.SIGKILL)
            rank1 = next(trace.glob("rank1-*.jsonl")).name
            try:
                os.kill(int(rank1.split("-pid")[1].split(".")[0]), signal.SIGKILL)
            except ProcessLookupError:
                pass

        return _measure(trace, kill)
    finally:
        for p in procs:
            _stop(p, str(trace))


def _agent_of_rank1(trace: Path) -> str:
    rank1 = next(trace.glob("rank1-*.jsonl")).name
    pid = rank1.split("-pid")[1].split(".")[0]
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat.rsplit(")", 1)[1].split()[1]  # the parent: the worker's agent


def _stop(proc: subprocess.Popen, marker: str) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if marker in (p / "cmdline").read_bytes().replace(b"\0", b" ").decode(
                        errors="replace"):
                    os.kill(int(p.name), signal.SIGKILL)
            except OSError:
                pass
