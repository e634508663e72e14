"""Random augmentation made deterministic: seeded per sample, not per DataLoader worker, so
that the number of workers cannot change a bit of an exact resume (exact resume under real
kills: tests/integration/test_exact_resume.py)."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset

from ftrain.data.items import SeededItems
from ftrain.tasks.builtin.datasets import VisionItems


class TinyImages(Dataset):
    """A torchvision-like dataset: (PIL image, label) pairs, as CIFAR10 returns them."""

    def __init__(self, n: int) -> None:
        from PIL import Image

        g = torch.Generator().manual_seed(7)
        pixels = torch.randint(0, 256, (n, 32, 32, 3), dtype=torch.uint8, generator=g)
        self.items = [(Image.fromarray(p.numpy()), i % 10) for i, p in enumerate(pixels)]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        return self.items[i]


def _epoch_batches(data: SeededItems, epoch: int, workers: int, global_seed: int):
    data.set_epoch(epoch)
    torch.manual_seed(global_seed)  # the global RNG, which seeds DataLoader workers
    loader = DataLoader(data, batch_size=4, num_workers=workers, shuffle=False)
    return [(x, y, i) for (x, y), i in loader]


def test_augmentation_is_seeded_per_sample_not_per_worker():
    """torchvision's own random transforms, made deterministic by the per-item forked RNG."""
    data = SeededItems(VisionItems(TinyImages(24), "cifar10", augment=True), seed=3)
    one = _epoch_batches(data, 1, workers=0, global_seed=0)
    two = _epoch_batches(data, 1, workers=2, global_seed=1)
    for (xa, ya, ia), (xb, yb, ib) in zip(one, two, strict=True):
        assert torch.equal(ia, ib) and torch.equal(ya, yb)
        assert torch.equal(xa, xb)
    # The augmentation is real: it changes with the epoch, and differs from no augmentation.
    other_epoch = _epoch_batches(data, 2, workers=0, global_seed=0)
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(one, other_epoch, strict=True))
    plain = SeededItems(VisionItems(TinyImages(24), "cifar10", augment=False), seed=3)
    assert not all(torch.equal(a[0], b[0]) for a, b in
                   zip(one, _epoch_batches(plain, 1, 0, 0), strict=True))
    # An (epoch, index) pair, as persistent workers receive it, is that epoch's item.
    (x_pair, _), i_pair = data.__getitems__([(1, 5)])[0]
    data.set_epoch(1)
    (x_one, _), i_one = data[5]
    assert i_pair == i_one == 5 and torch.equal(x_pair, x_one)
    # The caller's RNG streams are untouched by fetching items.
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    data[3], data[7]
    assert torch.equal(torch.rand(3), expected)
