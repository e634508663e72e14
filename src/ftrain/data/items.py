"""Datasets, per-item forked RNG, data fingerprints, and a DistributedSampler that resumes
mid-epoch.

A task's dataset yields ``(inputs, targets)``. The trainer wraps it in ``SeededItems``, which
produces every item under RNGs (python, numpy, torch) seeded from (seed, epoch, sample index)
and adds the index: any random transform (torchvision's own included) is then deterministic,
whatever the worker count or timing, and ``--trace-samples`` can record which samples each step
saw, which is how exactly-once data is tested.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, DistributedSampler, Sampler

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

    def split(n: int, stream: int) -> TensorItems:
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
        return TensorItems(x.contiguous(), labels)

    return split(train_size, 1), split(test_size, 2)


class TensorItems(Dataset):
    """In-memory tensors; items are (x, y). Drawing an item uses no randomness."""

    rng_free = True  # SeededItems may skip seeding the RNGs for these items

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        return self.x[i], self.y[i]


# ---------------------------------------------------------------------------- torchvision data
# Recorded in checkpoints and compared on resume: a change of the augmentation changes the
# samples, so it is refused like a change of the data. 1 was a hand-written seeded crop/flip.
AUGMENTATION_VERSION = "torchvision-v2 RandomCrop(pad 4)+RandomHorizontalFlip, forked RNG/2"


class VisionItems(Dataset):
    """A torchvision dataset turned into normalised tensors (+ torchvision v2 random crop and
    flip); items are (x, y). The random transforms draw from the global RNGs, which
    ``SeededItems`` seeds per item."""

    def __init__(self, base: Dataset, name: str, augment: bool) -> None:
        from torchvision.transforms import v2

        mean, std = NORMALIZATION[name]
        steps = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
        if augment:
            # After normalising, as before: the padding is 0 in normalised units.
            size = SPECS[name].image_size
            steps += [v2.RandomCrop(size, padding=4), v2.RandomHorizontalFlip()]
        self.base = base
        self.transform = v2.Compose(steps)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        img, label = self.base[i]
        return self.transform(img).as_subclass(torch.Tensor), torch.tensor(int(label))


# ---------------------------------------------------------------------------- per-item RNG
class SeededItems(Dataset):
    """Wraps a task's dataset: item ``i`` of epoch ``e`` is produced with python's, numpy's and
    torch's global RNGs seeded from (seed, e, i), and comes back as ``(item, i)``.

    An index is ``i`` (of the epoch last given to ``set_epoch``) or an ``(e, i)`` pair (see
    ``EpochTagged``). The RNG states are saved and restored around each fetch (one item, or a
    batch through ``__getitems__``), so the caller's random streams are untouched. Datasets
    that declare ``rng_free = True`` are fetched without seeding.
    """

    def __init__(self, base: Dataset, seed: int) -> None:
        self.base = base
        self.seed = seed
        self.epoch = 0
        self.seeded = not getattr(base, "rng_free", False)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, i: int):
        return self.__getitems__([i])[0]

    def __getitems__(self, indices: Sequence[Any]) -> list[tuple[Any, int]]:
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


# ---------------------------------------------------------------------------- fingerprints
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

    from ..storage import Storage

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
    return VisionItems(train, name, augment), VisionItems(test, name, False)


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
