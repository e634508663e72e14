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


class ShiftedRows(torch.utils.data.TensorDataset):
    """A TensorDataset subclass that draws its items its own way (with randomness)."""

    def __getitem__(self, i: int):
        x, y = super().__getitem__(i)
        return x + torch.rand(()), y


def _batches(items: SeededItems, workers: int, collate) -> list:
    from ftrain.data.items import EpochTagged

    order = torch.randperm(len(items), generator=torch.Generator().manual_seed(1)).tolist()
    loader = DataLoader(items, batch_size=5, sampler=EpochTagged(order, items),
                        num_workers=workers, collate_fn=collate)
    return list(loader)


def test_tensor_datasets_are_gathered_whole_as_the_rows_would_be_collated():
    """A tensor dataset's batch, taken by one indexing per tensor (no Python per item, no
    per-item seeding), equals the default collation of its rows: values, dtype, shape and
    strides; a subclass that draws its items its own way is seeded and collated per item."""
    from torch.utils.data import TensorDataset, default_collate

    from ftrain.data.items import Gathered, TensorItems, collate_rows

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(23, 3, 4, generator=g), torch.randint(0, 9, (23,), generator=g)
    mask = torch.rand(23, generator=g) > 0.5
    for data in (TensorDataset(x, y, mask), TensorItems(x.transpose(1, 2), y)):
        gathered, per_item = SeededItems(data, 3, gather=True), SeededItems(data, 3)
        assert gathered.gather and not gathered.seeded and not per_item.seeded
        gathered.set_epoch(2)
        assert isinstance(gathered.__getitems__([(2, 4), (2, 0)]), Gathered)
        for workers in (0, 1):
            got = _batches(gathered, workers, collate_rows)
            want = _batches(per_item, 0, default_collate)
            assert len(got) == len(want) == 5
            for (tensors_a, idx_a), (tensors_b, idx_b) in zip(got, want, strict=True):
                assert torch.equal(idx_a, idx_b) and idx_a.dtype == idx_b.dtype
                for a, b in zip(tensors_a, tensors_b, strict=True):
                    assert a.dtype == b.dtype and a.stride() == b.stride()
                    assert torch.equal(a, b)
        # A single item (the evaluation's padding batch) is a row, as before.
        assert torch.equal(gathered[4][0][0], data[4][0]) and gathered[4][1] == 4
    odd = SeededItems(ShiftedRows(x, y), 3, gather=True)
    assert odd.seeded and not odd.gather
    first, second = odd[2][0][0], odd[2][0][0]
    assert torch.equal(first, second)  # seeded per item
