"""The epoch's running metric sums: each step's sums stay on the device (no host sync) and are
added up exactly, in a fixed order, when the epoch ends or a checkpoint needs them."""

from __future__ import annotations

import torch

from ..runtime.distributed import Collectives


class MetricSums:
    """This run's per-step metric sums on this rank, not yet folded into the train state."""

    def __init__(self, coll: Collectives, device: torch.device, names: list[str],
                 owner: str) -> None:
        self.coll, self.device = coll, device
        self.names = list(names)  # fixed by the first batch (or the resumed state)
        self.owner = owner  # the task's class name, for the error below
        self.rows: list[torch.Tensor] = []

    def row(self, sums: dict[str, torch.Tensor]) -> torch.Tensor:
        """The metric sums of one batch as a float64 vector, in a fixed order of names."""
        if not self.names:
            self.names = list(sums)
        if set(sums) != set(self.names):
            raise ValueError(f"{self.owner}.loss returned the metric sums {sorted(sums)}; "
                             f"earlier batches returned {sorted(self.names)}: return the same "
                             "names every time")
        return torch.stack([torch.as_tensor(sums[k]).detach().to(self.device,
                                                                  torch.float64).reshape(())
                            for k in self.names])

    def append(self, step_row: torch.Tensor) -> None:
        self.rows.append(step_row)

    def totals(self, base: dict[str, float]) -> tuple[dict[str, float], int]:
        """``base`` plus this run's part of the epoch: the metric sums over ranks, each
        batch's sum taken in rank order and the batches added in order, and the number of
        batches; collective."""
        k = len(self.names)
        local = torch.stack(self.rows) if self.rows else torch.zeros(
            (0, k), dtype=torch.float64, device=self.device)
        rows = self.coll.gather_rows(local)  # (world, batches, metrics)
        per_batch = rows.sum(dim=0).cpu().tolist()
        totals = dict(base)
        for row in per_batch:
            for name, value in zip(self.names, row, strict=True):
                totals[name] = totals.get(name, 0.0) + value
        return totals, len(per_batch)

    def clear(self) -> None:
        self.rows = []
