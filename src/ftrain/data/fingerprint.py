"""Data fingerprints: a dataset's length and a digest of a deterministic sample of its items,
recorded in every checkpoint; a resume on changed data is refused."""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from .items import SeededItems, mix_seed

FINGERPRINT_ITEMS = 8


def fingerprint(dataset: Dataset, seed: int) -> dict[str, Any]:
    """The dataset's length and a digest of a deterministic sample of its items (produced as
    in epoch 0). Recorded in checkpoints; a resume on changed data is refused."""
    n = len(dataset)  # type: ignore[arg-type]
    h = hashlib.sha256(f"len={n}".encode())
    if n:
        g = torch.Generator().manual_seed(mix_seed(0xF1A6, n))
        picks = sorted(set(torch.randint(0, n, (FINGERPRINT_ITEMS,), generator=g).tolist()))
        for item, i in SeededItems(dataset, seed).__getitems__(picks):
            h.update(f"#{i}".encode())
            _digest_into(h, item)
    return {"len": n, "digest": h.hexdigest()[:16]}


def _digest_into(h: Any, obj: Any) -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(obj, dict):
        for k in sorted(obj, key=str):
            h.update(f"K{k}".encode())
            _digest_into(h, obj[k])
    elif isinstance(obj, (list, tuple)):
        h.update(f"L{len(obj)}".encode())
        for v in obj:
            _digest_into(h, v)
    elif isinstance(obj, np.ndarray):
        _digest_into(h, torch.from_numpy(np.ascontiguousarray(obj)))
    else:
        h.update(repr(obj).encode())
