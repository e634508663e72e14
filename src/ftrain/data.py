"""Datasets, seeded per-sample augmentation, and a DistributedSampler that resumes mid-epoch.

Every item is ``(image, label, index)``: the index lets the trainer trace exactly which samples
each step saw (``--trace-samples``), which is how exactly-once data is tested.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch.utils.data import Dataset, DistributedSampler

log = logging.getLogger(__name__)

# (mean, std) per channel, the usual published figures.
NORMALIZATION = {
    "fashion-mnist": ((0.2860,), (0.3530,)),
    "mnist": ((0.1307,), (0.3081,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
}


class DataError(Exception):
    """Input data missing or unusable; the message names the folder and the flag."""


@dataclass(frozen=True)
class DataSpec:
    in_channels: int
    image_size: int
    num_classes: int


SPECS = {
    "synthetic": DataSpec(1, 28, 10),
    "fashion-mnist": DataSpec(1, 28, 10),
    "mnist": DataSpec(1, 28, 10),
    "cifar10": DataSpec(3, 32, 10),
}


def mix_seed(*parts: int) -> int:
    """A 63-bit seed derived from integers (SplitMix64 over the parts): no Python hash()."""
    x = 0x9E3779B97F4A7C15
    mask = (1 << 64) - 1
    for p in parts:
        x = (x ^ (int(p) & mask)) & mask
        x = (x + 0x9E3779B97F4A7C15) & mask
        z = x
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        x = z ^ (z >> 31)
    return x & ((1 << 63) - 1)


# ---------------------------------------------------------------------------- synthetic data
def make_synthetic(seed: int, train_size: int, test_size: int) -> tuple[Dataset, Dataset]:
    """A FashionMNIST-shaped task (1x28x28, 10 classes) generated from ``seed``.

    Each class is a smooth random prototype; a sample is its prototype, randomly scaled and
    shifted, blended with another class's prototype and buried in noise, and 8% of labels are
    flipped. Classes overlap, so accuracy climbs over several epochs instead of saturating.
    """
    g = torch.Generator().manual_seed(mix_seed(seed, 0x5EED))
    coarse = torch.randn(10, 1, 7, 7, generator=g)
    protos = torch.nn.functional.interpolate(coarse, size=(28, 28), mode="bilinear",
                                             align_corners=False)
    protos = (protos - protos.mean(dim=(2, 3), keepdim=True)) / protos.std(dim=(2, 3), keepdim=True)

    def split(n: int, stream: int) -> TensorIndexed:
        gs = torch.Generator().manual_seed(mix_seed(seed, stream))
        labels = torch.randint(0, 10, (n,), generator=gs)
        other = (labels + torch.randint(1, 10, (n,), generator=gs)) % 10
        scale = 0.6 + 0.8 * torch.rand(n, 1, 1, 1, generator=gs)
        blend = 0.8 * torch.rand(n, 1, 1, 1, generator=gs)
        x = scale * protos[labels] + blend * protos[other]
        shifts = torch.randint(-3, 4, (n, 2), generator=gs)
        for i in range(n):  # cheap: n rolls of 28x28
            x[i] = torch.roll(x[i], shifts=(int(shifts[i, 0]), int(shifts[i, 1])), dims=(1, 2))
        x = x + 2.6 * torch.randn(x.shape, generator=gs)
        flip = torch.rand(n, generator=gs) < 0.08
        labels = torch.where(flip, torch.randint(0, 10, (n,), generator=gs), labels)
        return TensorIndexed(x.contiguous(), labels)

    return split(train_size, 1), split(test_size, 2)


class TensorIndexed(Dataset):
    """In-memory tensors; items are (x, y, index)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        return self.x[i], int(self.y[i]), i


# ---------------------------------------------------------------------------- torchvision data
class SeededCropFlip:
    """Random 4-pixel-padded crop and horizontal flip drawn from a given generator, so the
    augmentation of a sample depends on (seed, epoch, index) alone, not on worker or timing."""

    def __init__(self, size: int, padding: int = 4) -> None:
        self.size, self.padding = size, padding

    def __call__(self, img: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        p = self.padding
        padded = torch.nn.functional.pad(img, (p, p, p, p))
        top = int(torch.randint(0, 2 * p + 1, (1,), generator=g))
        left = int(torch.randint(0, 2 * p + 1, (1,), generator=g))
        out = padded[:, top:top + self.size, left:left + self.size]
        if bool(torch.rand(1, generator=g) < 0.5):
            out = out.flip(-1)
        return out


class VisionIndexed(Dataset):
    """A torchvision dataset with ToTensor + Normalize (+ seeded augmentation); items are
    (x, y, index)."""

    def __init__(self, base: Dataset, name: str, seed: int, augment: bool) -> None:
        from torchvision import transforms

        mean, std = NORMALIZATION[name]
        self.base = base
        self.to_tensor = transforms.Compose([transforms.ToTensor(), transforms.Normalize(mean, std)])
        self.augment = SeededCropFlip(SPECS[name].image_size) if augment else None
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        img, label = self.base[i]
        x = self.to_tensor(img)
        if self.augment is not None:
            g = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch, i))
            x = self.augment(x, g)
        return x, int(label), i


def _torchvision_class(name: str):
    from torchvision import datasets

    return {"fashion-mnist": datasets.FashionMNIST, "mnist": datasets.MNIST,
            "cifar10": datasets.CIFAR10}[name]


def fetch_remote_data_dir(url: str, cache_root: str, storage_options: dict) -> str:
    """Copy a remote data folder (e.g. s3://bucket/datasets) into a node-local cache once.

    Every file is downloaded through Storage (retries, atomic per file) and its size checked
    against the listing; a marker written last records a complete copy, so an interrupted copy
    is redone. Returns the local folder. Called by one process per node (local rank 0); the
    others wait at a barrier and then find the marker. Raises DataError naming --data-dir.
    """
    import hashlib
    import shutil

    from .storage import Storage

    local = os.path.join(cache_root, hashlib.sha256(url.encode()).hexdigest()[:16])
    marker = os.path.join(local, ".complete")
    if os.path.exists(marker):
        return local
    storage = Storage(url, storage_options)
    files = storage.walk()
    if not files:
        raise DataError(f"--data-dir {url}: no files there; check the URL and the credentials")
    tmp = local + f".partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    log.info("fetching --data-dir %s (%d files, %.1f MiB) into %s", url, len(files),
             sum(files.values()) / 2**20, local)
    for rel, size in sorted(files.items()):
        dest = os.path.join(tmp, *rel.split("/"))
        storage.download(rel, dest)
        if os.path.getsize(dest) != size:
            raise DataError(f"--data-dir {url}: {rel} arrived with {os.path.getsize(dest)} bytes, "
                            f"the listing says {size}; rerun to fetch it again")
    shutil.rmtree(local, ignore_errors=True)
    os.makedirs(cache_root, exist_ok=True)
    os.replace(tmp, local)
    with open(marker, "w") as fh:
        fh.write(url + "\n")
    return local


def build_datasets(name: str, data_dir: str, download: bool, seed: int, train_size: int,
                   test_size: int) -> tuple[Dataset, Dataset]:
    """Train and test datasets. Raises DataError naming --data-dir / --download when missing."""
    if name == "synthetic":
        return make_synthetic(seed, train_size, test_size)
    cls = _torchvision_class(name)
    try:
        train = cls(data_dir, train=True, download=download)
        test = cls(data_dir, train=False, download=download)
    except RuntimeError as e:  # torchvision: "Dataset not found. You can use download=True ..."
        if download:
            raise DataError(f"--dataset {name}: download into --data-dir {data_dir} failed ({e}); "
                            "check the network, or place the files there by hand") from None
        raise DataError(f"--dataset {name}: not found in --data-dir {os.path.abspath(data_dir)}; "
                        "pass --download to fetch it, or point --data-dir at a folder that "
                        "holds it") from None
    except OSError as e:
        raise DataError(f"--dataset {name}: cannot read --data-dir {data_dir}: {e}") from None
    augment = name == "cifar10"
    return VisionIndexed(train, name, seed, augment), VisionIndexed(test, name, seed, False)


# ---------------------------------------------------------------------------- sampling
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
