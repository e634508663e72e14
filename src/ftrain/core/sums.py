"""The epoch's running metric sums: each step's sums stay on the device (no host sync) and are
added up exactly, in a fixed order, when the epoch ends or a checkpoint needs them."""

from __future__ import annotations

from typing import Any

import torch

from ..errors import InputError
from ..runtime.distributed import Collectives


def split_loss(owner: str, out: Any) -> tuple[Any, dict[str, Any]]:
    """What ``Task.loss`` returned, as (loss, metric sums); InputError, saying what it must
    return, for anything else (a script's loss function ported as it is returns the loss
    alone). Only the answer's shape is checked here: an error raised inside the task's loss
    is the task's own, with its traceback."""
    try:
        loss, sums = out
        sums.keys  # noqa: B018 - a mapping of names
    except (TypeError, ValueError, AttributeError):
        raise InputError(f"{owner}.loss returned {_kind(out)}; it must return a pair: the loss "
                         "(summed over the batch's items, or their mean with loss_reduction = "
                         "'mean') and a dict of metric sums, for example "
                         "`return loss, {'loss': loss.detach()}`") from None
    return loss, sums


def _kind(out: Any) -> str:
    if isinstance(out, torch.Tensor):
        return f"a tensor of shape {tuple(out.shape)}"
    if isinstance(out, (tuple, list)) and len(out) == 2:
        return f"a pair whose second value is {_a(out[1])}, not a dict"
    if isinstance(out, (tuple, list)):
        return f"{_a(out)} of {len(out)} values"
    return _a(out)


def _a(value: Any) -> str:
    """'a list', 'an int': the value's type with its article."""
    name = type(value).__name__
    return f"{'an' if name[0] in 'aeiouAEIOU' else 'a'} {name}"


class MetricSums:
    """This run's per-step metric sums, not yet folded into the train state.

    ``exchanged``: each step's row holds every rank's sums (world, metrics), received with the
    step's gradients (runtime/exchange.py), so adding them up needs no collective; otherwise
    each row is this rank's (metrics,) and adding up gathers the other ranks'."""

    def __init__(self, coll: Collectives, device: torch.device, names: list[str],
                 owner: str, exchanged: bool = False) -> None:
        self.coll, self.device = coll, device
        self.names = list(names)  # fixed by the first batch (or the resumed state)
        self._name_set = set(self.names)
        self.owner = owner  # the task's class name, for the error below
        self.exchanged = exchanged
        self.rows: list[torch.Tensor] = []
        # What Tensor.get_device() says for this device (-1: the CPU); None: never equal.
        self._index = -1 if device.type == "cpu" else device.index

    def row(self, sums: dict[str, torch.Tensor]) -> torch.Tensor:
        """The metric sums of one batch as a float64 vector, in a fixed order of names."""
        if not self.names:
            self.names, self._name_set = list(sums), set(sums)
        if sums.keys() != self._name_set:
            raise InputError(f"{self.owner}.loss returned the metric sums {sorted(sums)}; "
                             f"earlier batches returned {sorted(self.names)}: return the same "
                             "names every time")
        try:  # the common case, one scalar tensor per name on this device: 4 us, not 11
            row = torch.stack([sums[k].double() for k in self.names])
            if row.dim() == 1 and row.get_device() == self._index:
                return row.detach() if row.requires_grad else row
        except (AttributeError, RuntimeError, TypeError):  # numbers, devices, shapes mixed
            pass
        return torch.stack([torch.as_tensor(sums[k]).detach().to(self.device,
                                                                  torch.float64).reshape(())
                            for k in self.names])

    def append(self, step_row: torch.Tensor) -> None:
        self.rows.append(step_row)

    def newest(self) -> torch.Tensor:
        """The newest step's sums over ranks (collective unless exchanged)."""
        if self.exchanged:
            return _over_ranks(self.rows[-1].unsqueeze(0))[0]
        return self.coll.sum_(self.rows[-1].clone())

    def totals(self, base: dict[str, float]) -> tuple[dict[str, float], int]:
        """``base`` plus this run's part of the epoch: the metric sums over ranks, each
        batch's sum taken in rank order and the batches added in order, and the number of
        batches; collective unless exchanged."""
        k = len(self.names)
        if self.exchanged:  # (batches, world, metrics)
            rows = torch.stack(self.rows) if self.rows else torch.zeros(
                (0, self.coll.info.world_size, k), dtype=torch.float64, device=self.device)
        else:
            local = torch.stack(self.rows) if self.rows else torch.zeros(
                (0, k), dtype=torch.float64, device=self.device)
            rows = self.coll.gather_rows(local).transpose(0, 1)  # (batches, world, metrics)
        per_batch = _over_ranks(rows).cpu().tolist()
        totals = dict(base)
        for row in per_batch:
            for name, value in zip(self.names, row, strict=True):
                totals[name] = totals.get(name, 0.0) + value
        return totals, len(per_batch)

    def clear(self) -> None:
        self.rows = []


def _over_ranks(rows: torch.Tensor) -> torch.Tensor:
    """(batches, world, metrics) -> (batches, metrics): each sum taken in rank order."""
    total = rows[:, 0].clone()
    for r in range(1, rows.shape[1]):
        total += rows[:, r]
    return total
