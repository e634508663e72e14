"""Seeding: every random stream derives from (seed, epoch, rank) and, per item, from (seed,
epoch, sample index); a mid-epoch checkpoint carries each rank's RNG states."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

from ..data.items import mix_seed


def seed_all(seed: int) -> None:
    """Seed python, numpy and torch (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def init_seed(seed: int) -> int:
    """Seed used to build the model: the same on every rank, before the model exists."""
    return mix_seed(seed, 0x1417)


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    return mix_seed(seed, epoch, rank)


def resume_seed(seed: int, epoch: int, batch: int, rank: int) -> int:
    """Seed of a mid-epoch resume that has no saved RNG states for this rank (another world
    size, or a checkpoint without them)."""
    return mix_seed(seed, epoch, batch, rank, 0x57E9)


SEEDS_DOC = {"epoch": "mix_seed(seed, epoch, rank), once per epoch; a mid-epoch resume "
                      "restores each rank's saved RNG states",
             "resume_other_world": "mix_seed(seed, epoch, batch, rank, 0x57E9)",
             "data_order": "mix_seed(seed, epoch)",
             "item": "mix_seed(seed, epoch, sample_index)"}


def rng_state(device: torch.device) -> dict[str, Any]:
    """This process's python, numpy, torch (and this GPU's) RNG states, as checkpointable
    values (tensors, ints, lists)."""
    version, internal, gauss = random.getstate()
    _name, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng(state: dict[str, Any], device: torch.device) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
