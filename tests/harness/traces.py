"""Helpers for the preemption, world-size, compatibility and elastic tests: the sample traces
(``--trace-samples``), worker processes below a launcher, torchrun's failure report."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
from collections import Counter
from pathlib import Path

import torch

from ftrain.checkpoint import CheckpointStore, Loaded
from ftrain.data.sampler import ResumableDistributedSampler
from ftrain.storage import Storage
from tests.harness.processes import PY, ROOT, base_env, free_port, processes_matching

TRACE_NAME = re.compile(r"^rank(\d+)-pid(\d+)\.jsonl$")


def read_trace(folder: Path) -> list[dict]:
    """Every traced per-rank batch below ``folder`` (all runs, all ranks), in file order."""
    out = []
    for f in sorted(Path(folder).glob("*.jsonl")):
        for line in f.read_text().splitlines():
            if line.endswith("}"):  # a line being written is skipped, not misread
                out.append(json.loads(line))
    return out


def trace_pids(folder: Path) -> dict[int, int]:
    """{rank: pid} of the newest process of each rank that wrote a trace below ``folder``."""
    found: dict[int, tuple[float, int]] = {}
    for f in Path(folder).glob("*.jsonl"):
        m = TRACE_NAME.match(f.name)
        if m:
            rank, pid, mtime = int(m.group(1)), int(m.group(2)), f.stat().st_mtime
            if rank not in found or mtime >= found[rank][0]:
                found[rank] = (mtime, pid)
    return {r: pid for r, (_, pid) in found.items()}


def last_step(lines: list[dict]) -> int:
    """The last step every rank completed; asserts the ranks agree on it."""
    per_rank: dict[int, int] = {}
    for x in lines:
        per_rank[x["rank"]] = max(per_rank.get(x["rank"], 0), x["step"])
    assert len(set(per_rank.values())) == 1, f"ranks stopped at different steps: {per_rank}"
    return next(iter(per_rank.values()))


def steps_once_per_rank(lines: list[dict]) -> dict[int, list[int]]:
    """{rank: sorted steps}; asserts no rank trained a step twice."""
    per_rank: dict[int, list[int]] = {}
    for x in lines:
        per_rank.setdefault(x["rank"], []).append(x["step"])
    for rank, steps in per_rank.items():
        twice = [s for s, n in Counter(steps).items() if n > 1]
        assert not twice, f"rank {rank} trained steps {twice} twice"
    return {r: sorted(s) for r, s in per_rank.items()}


class _Sized(torch.utils.data.Dataset):
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i


def epoch_schedule(n: int, global_batch: int, seed: int, epoch: int) -> list[int]:
    """The epoch's sample order as the trainer's sampler cuts it (remainder dropped)."""
    s = ResumableDistributedSampler(_Sized(n), 1, 0, global_batch, seed)
    s.set_epoch(epoch)
    return s.epoch_order().tolist()


def assert_epoch_exactly_once(lines: list[dict], n: int, global_batch: int, seed: int,
                              epoch: int) -> None:
    """Across all runs and ranks, epoch ``epoch`` trained every sample of its schedule once,
    and each global batch was exactly the schedule's batch (whatever the world size)."""
    order = epoch_schedule(n, global_batch, seed, epoch)
    seen = Counter(i for x in lines if x["epoch"] == epoch for i in x["idx"])
    twice = sorted(i for i, c in seen.items() if c > 1)
    missing = sorted(set(order) - set(seen))
    extra = sorted(set(seen) - set(order))
    assert not twice and not missing and not extra, (
        f"epoch {epoch}: {len(twice)} samples twice {twice[:10]}, {len(missing)} never "
        f"{missing[:10]}, {len(extra)} outside the schedule {extra[:10]}")
    batches: dict[int, list[int]] = {}
    for x in lines:
        if x["epoch"] == epoch:
            batches.setdefault(x["batch"], []).extend(x["idx"])
    for b, idx in batches.items():
        assert sorted(idx) == sorted(order[b * global_batch:(b + 1) * global_batch]), (
            f"epoch {epoch} global batch {b} is not the schedule's batch")


def latest(ckpt_dir: Path | str) -> Loaded:
    """The newest valid checkpoint, verified and loaded in this process (faster than a
    ``python -m src.ckpt`` subprocess)."""
    loaded = CheckpointStore(Storage(str(ckpt_dir))).latest()
    assert loaded is not None, f"no valid checkpoint in {ckpt_dir}"
    return loaded


def kill_leftovers(text: str) -> None:
    """SIGKILL, by pid, every process still running whose command line holds ``text`` (a
    test's tmp_path): workers live in sessions of their own and outlive a killed launcher."""
    for pid in processes_matching(text):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


_FAILURE = re.compile(r"rank\s*:\s*(\d+) \(local_rank: \d+\)\s*\n\s*exitcode\s*:\s*(-?\d+)")


def torchrun_failures(log: str) -> dict[int, int]:
    """{rank: exit code} from torchrun's ChildFailedError report."""
    return {int(r): int(c) for r, c in _FAILURE.findall(log)}


def launch_run_cmd(train_args: list[str], nproc: int,
                   torchrun_args: list[str] | None = None) -> list[str]:
    """The container entry point (ftrain-run) around torchrun around ``src.train``."""
    return [PY, "-m", "ftrain.launcher", "--nproc_per_node", str(nproc), "--master_addr",
            "127.0.0.1", "--master_port", str(free_port()), *(torchrun_args or []), "-m",
            "src.train", *train_args]


def start_logged(cmd: list[str], log_path: Path, env: dict | None = None) -> subprocess.Popen:
    """Start ``cmd`` in a session of its own, stdout and stderr to ``log_path``."""
    with open(log_path, "w") as out:
        return subprocess.Popen(cmd, cwd=ROOT, env=base_env(env), stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
