"""Items of a task's dataset, each produced under its own forked RNG.

A task's dataset yields ``(inputs, targets)``. The trainer wraps it in ``SeededItems``, which
produces every item under RNGs (python, numpy, torch) seeded from (seed, epoch, sample index)
and adds the index: any random transform (torchvision's own included) is then deterministic,
whatever the worker count or timing, and ``--trace-samples`` can record which samples each step
saw, which is how exactly-once data is tested.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler, TensorDataset, default_collate


class DataError(Exception):
    """Input data missing or unusable; the message names the folder and the flag."""


_GOLDEN = 0x9E3779B97F4A7C15
_MASK64 = (1 << 64) - 1
_MASK63 = (1 << 63) - 1


def mix_seed(*parts: int) -> int:
    """A 63-bit seed derived from integers (SplitMix64 over the parts): no Python hash()."""
    return _mix(_GOLDEN, parts) & _MASK63


def _mix(x: int, parts: tuple[int, ...]) -> int:
    """The hash's 64-bit state ``x`` after ``parts``."""
    for p in parts:
        x = (x ^ (int(p) & _MASK64)) & _MASK64
        x = (x + _GOLDEN) & _MASK64
        z = x
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        x = z ^ (z >> 31)
    return x


def mix_seeds(prefix: tuple[int, ...], first: int, count: int, suffix: tuple[int, ...]
              ) -> list[int]:
    """``[mix_seed(*prefix, b, *suffix) for b in range(first, first + count)]``, the same
    numbers computed on numpy's uint64 arrays (whose arithmetic wraps as the masks above do):
    0.05 us a seed instead of 2-4 us."""
    x = np.full(count, _mix(_GOLDEN, prefix), dtype=np.uint64)
    parts = [np.arange(first, first + count, dtype=np.uint64)]
    parts += [np.uint64(int(p) & _MASK64) for p in suffix]
    with np.errstate(over="ignore"):
        for p in parts:
            x = (x ^ p) + np.uint64(_GOLDEN)
            z = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
            z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
            x = z ^ (z >> np.uint64(31))
    return (x & np.uint64(_MASK63)).tolist()


class TensorItems(Dataset):
    """In-memory tensors; items are (x, y). Drawing an item uses no randomness."""

    rng_free = True  # SeededItems may skip seeding the RNGs for these items

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        return self.x[i], self.y[i]


def tensor_rows(data: Dataset) -> tuple[torch.Tensor, ...] | None:
    """The tensors whose rows are ``data``'s items, for datasets whose items are known to be
    drawn by indexing them and nothing else: ``TensorItems`` and torch's ``TensorDataset``
    (not their subclasses, which may draw items their own way). None for any other."""
    if type(data) is TensorItems:
        return (data.x, data.y)
    if type(data) is TensorDataset:
        return tuple(data.tensors)
    return None


class Gathered:
    """A batch that ``SeededItems.__getitems__`` gathered whole: ``collate_rows`` passes it
    through."""

    __slots__ = ("batch",)

    def __init__(self, batch: list[Any]) -> None:
        self.batch = batch


def collate_rows(rows: Any) -> Any:
    """The DataLoader's collate_fn over ``SeededItems`` (without a task's own): a gathered
    batch as it is, a list of ``(item, index)`` rows through ``default_collate``."""
    if isinstance(rows, Gathered):
        return rows.batch
    return default_collate(rows)


# ---------------------------------------------------------------------------- per-item RNG
class SeededItems(Dataset):
    """Wraps a task's dataset: item ``i`` of epoch ``e`` is produced with python's, numpy's and
    torch's global RNGs seeded from (seed, e, i), and comes back as ``(item, i)``.

    An index is ``i`` (of the epoch last given to ``set_epoch``) or an ``(e, i)`` pair (see
    ``EpochTagged``). The RNG states are saved and restored around each fetch (one item, or a
    batch through ``__getitems__``), so the caller's random streams are untouched. Datasets
    that declare ``rng_free = True``, and tensor datasets (``tensor_rows``), are fetched
    without seeding.

    ``gather``: a batch of a tensor dataset comes back as one ``Gathered`` batch, its rows
    taken by one indexing of each tensor, equal to what ``default_collate`` stacks from the
    rows one by one (for a DataLoader whose collate_fn is ``collate_rows``): no Python per
    item.
    """

    def __init__(self, base: Dataset, seed: int, gather: bool = False) -> None:
        self.base = base
        self.seed = seed
        self.epoch = 0
        tensors = tensor_rows(base) is not None
        self.seeded = not (getattr(base, "rng_free", False) or tensors)
        self.gather = gather and tensors

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, i: int):
        return self._rows([i])[0]

    def __getitems__(self, indices: Sequence[Any]) -> list[tuple[Any, int]] | Gathered:
        rows = tensor_rows(self.base) if self.gather else None
        if rows is not None:  # looked up per batch: the task may have replaced the tensors
            at = torch.tensor([i[1] if isinstance(i, tuple) else i for i in indices],
                              dtype=torch.int64)
            # default_collate makes a list of a batch of tuples, and stacks into new
            # contiguous tensors: the same here.
            return Gathered([[t[at].contiguous() for t in rows], at])
        return self._rows(indices)

    def _rows(self, indices: Sequence[Any]) -> list[tuple[Any, int]]:
        keys = [i if isinstance(i, tuple) else (self.epoch, i) for i in indices]
        if not self.seeded:
            return [(self.base[i], i) for _epoch, i in keys]
        saved = _rng_states()
        try:
            out = []
            for epoch, i in keys:
                _seed_rngs(mix_seed(self.seed, epoch, i))
                out.append((self.base[i], i))
            return out
        finally:
            _restore_rngs(saved)


class EpochTagged(Sampler):
    """The indices of ``sampler`` as ``(epoch, index)`` pairs for ``items``, the epoch being
    the one ``items`` is set to when an iteration starts.

    Persistent DataLoader workers keep the copy of the dataset they were forked with, which
    never sees a later ``set_epoch``: the epoch travels with every index instead. ``idle``
    makes an iteration empty, so that an iterator can start its workers without giving them
    work.
    """

    def __init__(self, sampler: Sampler, items: SeededItems) -> None:
        self.sampler, self.items = sampler, items
        self.idle = False

    def __iter__(self) -> Iterator[tuple[int, int]]:
        if self.idle:
            return iter(())
        epoch = self.items.epoch
        return ((epoch, i) for i in self.sampler)

    def __len__(self) -> int:
        return 0 if self.idle else len(self.sampler)  # type: ignore[arg-type]


def _rng_states() -> tuple:
    return random.getstate(), np.random.get_state(), torch.default_generator.get_state()


def _seed_rngs(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.default_generator.manual_seed(seed)  # CPU only: seeding CUDA would sync every device


def _restore_rngs(saved: tuple) -> None:
    random.setstate(saved[0])
    np.random.set_state(saved[1])
    torch.default_generator.set_state(saved[2])
