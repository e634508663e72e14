"""The sample traces that ``--trace-samples FOLDER`` makes every rank write (one JSON line per
trained batch: epoch, step, batch, rank, world, the sample indices), read back and checked:
no step trained twice, every sample of an epoch once, whatever the world sizes."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from ftrain.data.sampler import ResumableDistributedSampler

TRACE_NAME = re.compile(r"^rank(\d+)-pid(\d+)\.jsonl$")


def read_trace(folder: Path) -> list[dict[str, Any]]:
    """Every traced per-rank batch below ``folder`` (all runs, all ranks), in file order. A line
    still being written (or cut short by a kill) is skipped, not misread."""
    out = []
    for path in sorted(Path(folder).glob("rank*.jsonl")):
        for line in path.read_text().splitlines(keepends=True):
            if line.endswith("\n"):
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
