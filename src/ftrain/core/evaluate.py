"""Evaluation: the task's metrics over the whole eval set, each item once, sharded over the
ranks, summed exactly (float64) and reduced to the same numbers on every rank."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, default_collate

from ..runtime.distributed import Collectives, DistInfo
from ..tasks import Task
from .batching import autocast, to_device
from .sums import split_loss


@torch.no_grad()
def evaluate(task: Task, model: nn.Module, loader: DataLoader, items: Any, info: DistInfo,
             coll: Collectives, precision: str, sharded: bool, names_if_empty: list[str],
             beat: Any) -> dict[str, float]:
    """Collective. ``loader``: this rank's share of ``items``; ``sharded``: the model is
    FSDP2-sharded (every forward is collective); ``names_if_empty``: the metric names a rank
    with no eval item reports (the training sums' names, which are the same); ``beat``:
    called per batch (the heartbeat: an evaluation may take longer than a probe waits)."""
    if info.is_distributed:
        # BatchNorm running stats drift apart per rank after the last forward; rank 0's
        # are the model's (they are what is checkpointed).
        for b in model.buffers():
            torch.distributed.broadcast(b, src=0)
    model.eval()
    names: list[str] = []
    totals: torch.Tensor | None = None
    # Under fsdp every forward is collective (each unit gathers its parameters): a rank
    # with fewer eval batches than rank 0 runs its last batch again, discarded.
    batch = loader.batch_size or 1
    padding = -(-len(range(0, len(items), info.world_size)) // batch) - len(loader) \
        if sharded and info.world_size > 1 else 0
    inputs = None
    for (inputs, targets), idx in loader:
        beat()
        with autocast(precision, info.device):
            out = task.forward(model, to_device(inputs, info.device))
            _, sums = split_loss(type(task).__name__,
                                 task.loss(out, to_device(targets, info.device)))
        if totals is None:
            names = list(sums)
            totals = torch.zeros(len(names) + 1, dtype=torch.float64, device=info.device)
        for i, name in enumerate(names):
            totals[i] += torch.as_tensor(sums[name]).to(torch.float64)
        totals[-1] += len(idx)
    if padding and inputs is None:  # no eval item of its own: rank 0's first one
        (inputs, _targets), _ = (loader.collate_fn or default_collate)([items[0]])
    for _ in range(padding):
        with autocast(precision, info.device):
            task.forward(model, to_device(inputs, info.device))
    # Every rank takes part in the reduction, even one with no eval item.
    if totals is None:
        names = list(names_if_empty)
        totals = torch.zeros(len(names) + 1, dtype=torch.float64, device=info.device)
    coll.sum_(totals)
    model.train()
    values = totals.cpu().tolist()
    return task.metrics(dict(zip(names, values[:-1], strict=True)), int(values[-1]))
