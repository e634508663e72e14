"""Seeding: every random stream derives from (seed, epoch, step, rank) and, per item, from
(seed, epoch, sample index). Nothing about the RNGs needs saving: the state at any step
boundary, of any rank, is derived from those numbers, by any process (a survivor checkpoints
the step of a dead rank's peers without its RNG states)."""

from __future__ import annotations

import random

import numpy as np
import torch

from ..data.items import mix_seed, mix_seeds

_STEP_SALT = 0x5EED


def seed_all(seed: int) -> None:
    """Seed python, numpy and torch (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class StepSeeder:
    """Seeds, before each step of one epoch, python, numpy, torch's CPU generator and this
    process's own CUDA device with ``step_seed(seed, epoch, batch, rank)``. Only its own
    device: ``torch.manual_seed`` (every CUDA device, 90 us) cost 30% of a small model's step
    on an H100. The seeds are hashed a few thousand at a time (mix_seeds) and the seeding
    functions looked up once: each microsecond counts against a small model's step
    (docs/development/benchmarks-cpu.md)."""

    CHUNK = 4096  # seeds hashed at once

    def __init__(self, seed: int, epoch: int, rank: int, device: torch.device) -> None:
        self._prefix, self._suffix = (seed, epoch), (rank, _STEP_SALT)
        self._first, self._seeds = 0, []
        self._python, self._numpy = random.seed, np.random.seed
        self._torch = torch.default_generator.manual_seed
        self._cuda = (torch.cuda.default_generators[device.index].manual_seed
                      if device.type == "cuda" else None)

    def __call__(self, batch: int) -> None:
        i = batch - self._first
        if not 0 <= i < len(self._seeds):
            self._first, i = batch, 0
            self._seeds = mix_seeds(self._prefix, batch, self.CHUNK, self._suffix)
        seed = self._seeds[i]
        self._python(seed)
        self._numpy(seed & 0xFFFFFFFF)
        self._torch(seed)
        if self._cuda is not None:
            self._cuda(seed)


def init_seed(seed: int) -> int:
    """Seed used to build the model: the same on every rank, before the model exists."""
    return mix_seed(seed, 0x1417)


def step_seed(seed: int, epoch: int, batch: int, rank: int) -> int:
    """Seed of every RNG of ``rank`` for the step that trains ``batch`` of ``epoch``."""
    return mix_seed(seed, epoch, batch, rank, _STEP_SALT)



SEEDS_DOC = {"step": "mix_seed(seed, epoch, batch_in_epoch, rank, 0x5EED) before every step, "
                     "on python, numpy, torch's CPU generator and the rank's own GPU",
             "data_order": "mix_seed(seed, epoch)",
             "item": "mix_seed(seed, epoch, sample_index)"}
