"""The built-in task's datasets: the embedded synthetic default (no download) and
torchvision's FashionMNIST, MNIST and CIFAR-10."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch.utils.data import Dataset

from ...data.items import DataError, TensorItems, mix_seed

# (mean, std) per channel, the usual published figures.
NORMALIZATION = {
    "fashion-mnist": ((0.2860,), (0.3530,)),
    "mnist": ((0.1307,), (0.3081,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
}


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


def _torchvision_class(name: str):
    from torchvision import datasets

    return {"fashion-mnist": datasets.FashionMNIST, "mnist": datasets.MNIST,
            "cifar10": datasets.CIFAR10}[name]


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
