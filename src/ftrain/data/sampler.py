"""Samplers: the training epoch as a sequence of global batches that resumes mid-epoch on
any world size, and the evaluation set sharded over the ranks."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Dataset, DistributedSampler

from .items import mix_seed


class ResumableDistributedSampler(DistributedSampler):
    """DistributedSampler whose epoch is a sequence of *global* batches.

    The epoch's permutation comes from (seed, epoch) alone and is cut into
    ``len(dataset) // global_batch`` global batches (the remainder is left out of that epoch,
    as with drop_last; a fresh permutation next epoch leaves out others). Rank r takes positions
    r, r+W, r+2W, ... of the permutation, so its k-th per-rank batch of ``global_batch / W``
    samples is a slice of global batch k: global batch k is the same set of samples for every
    world size W, and a resume on another world size continues the same sample sequence.
    ``set_start(batches)`` skips the global batches already trained in this epoch.
    """

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, global_batch: int,
                 seed: int, shuffle: bool = True) -> None:
        if global_batch % num_replicas:
            raise ValueError(f"--batch-size {global_batch} is not divisible by the world size "
                             f"{num_replicas}")
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle,
                         seed=seed, drop_last=True)
        self.global_batch = global_batch
        self.start_batch = 0

    @property
    def batches_per_epoch(self) -> int:
        return len(self.dataset) // self.global_batch

    def set_start(self, batches_done: int) -> None:
        if not 0 <= batches_done <= self.batches_per_epoch:
            raise ValueError(f"start batch {batches_done} outside 0..{self.batches_per_epoch}")
        self.start_batch = batches_done

    def epoch_order(self) -> torch.Tensor:
        """The epoch's global sample order (all ranks), before sharding."""
        n = len(self.dataset)
        if self.shuffle:
            g = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch))
            order = torch.randperm(n, generator=g)
        else:
            order = torch.arange(n)
        return order[: self.batches_per_epoch * self.global_batch]

    def __iter__(self) -> Iterator[int]:
        order = self.epoch_order()[self.start_batch * self.global_batch:]
        return iter(order[self.rank::self.num_replicas].tolist())

    def __len__(self) -> int:
        return (self.batches_per_epoch - self.start_batch) * self.global_batch // self.num_replicas


class EvalShardSampler(torch.utils.data.Sampler):
    """Rank r evaluates indices r, r+W, ...: the whole test set exactly once, no padding."""

    def __init__(self, n: int, num_replicas: int, rank: int) -> None:
        self.n, self.w, self.r = n, num_replicas, rank

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.r, self.n, self.w))

    def __len__(self) -> int:
        return len(range(self.r, self.n, self.w))
