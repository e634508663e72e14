"""A user-defined image classifier on a torchvision dataset, written against ftrain's public
API alone: its own model, torchvision v2 random augmentation (made deterministic by ftrain's
per-item RNG, no hand-written seeding), and an exponential moving average of the weights kept
as extra checkpointed state.

    # offline: torchvision's FakeData (generated images; no download)
    torchrun --nproc_per_node=2 -m ftrain.train --task examples.image_classifier:SmallResNet \\
        --checkpoint-dir ./checkpoints-images
    # CIFAR-10 (needs a download once)
    torchrun --nproc_per_node=2 -m ftrain.train --task examples.image_classifier:SmallResNet \\
        --task-args '{"dataset": "cifar10"}' --download --data-dir ./data
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import Dataset
from torchvision import datasets
from torchvision.transforms import v2

from ftrain import Task, TaskContext

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


def block(c_in: int, c_out: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out),
                         nn.ReLU(inplace=True))


class Residual(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(block(channels, channels), block(channels, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class Net(nn.Module):
    def __init__(self, width: int, classes: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            block(3, width), Residual(width), nn.MaxPool2d(2),
            block(width, 2 * width), Residual(2 * width), nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class SmallResNet(Task):
    """``dataset``: "fake" (torchvision FakeData, offline) or "cifar10"."""

    augmentation = "v2 RandomCrop(32, pad 4) + RandomHorizontalFlip/1"

    def __init__(self, dataset: str = "fake", width: int = 16, train_size: int = 2048,
                 test_size: int = 512, ema_decay: float = 0.99) -> None:
        if dataset not in ("fake", "cifar10"):
            raise ValueError(f"dataset must be 'fake' or 'cifar10', not {dataset!r}")
        self.dataset, self.width = dataset, width
        self.sizes = (train_size, test_size)
        self.ema_decay = ema_decay
        self.ema: dict[str, torch.Tensor] = {}

    def build_model(self) -> nn.Module:
        return Net(self.width, 10)

    def _data(self, ctx: TaskContext, train: bool, download: bool) -> Dataset:
        steps = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)]
        if train:
            steps += [v2.RandomCrop(32, padding=4), v2.RandomHorizontalFlip()]
        transform = v2.Compose(steps)
        if self.dataset == "cifar10":
            return datasets.CIFAR10(ctx.data_dir, train=train, transform=transform,
                                    download=download)
        # FakeData draws image i from a generator seeded with i (+ the offset): the same
        # images in every process; the random transforms draw from ftrain's per-item RNG.
        return datasets.FakeData(self.sizes[0] if train else self.sizes[1], (3, 32, 32), 10,
                                 transform=transform, random_offset=0 if train else 10**6)

    def prepare_data(self, ctx: TaskContext) -> None:
        if self.dataset == "cifar10" and ctx.download:
            self._data(ctx, True, True)
            self._data(ctx, False, True)

    def datasets(self, ctx: TaskContext) -> tuple[Dataset, Dataset]:
        return self._data(ctx, True, False), self._data(ctx, False, False)

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor):
        loss = nn.functional.cross_entropy(outputs, targets, reduction="sum")
        return loss, {"loss": loss.detach(), "acc": (outputs.argmax(1) == targets).sum()}

    # An EMA of the weights: updated after every step, checkpointed with the run.
    def after_step(self, model: nn.Module) -> None:
        with torch.no_grad():
            for name, value in model.state_dict().items():
                if not value.is_floating_point():
                    continue
                if name not in self.ema:
                    self.ema[name] = value.detach().clone()
                else:
                    self.ema[name].lerp_(value, 1.0 - self.ema_decay)

    def state_dict(self) -> dict[str, object]:
        return {"ema": self.ema}

    def load_state_dict(self, state: dict[str, object]) -> None:
        self.ema = {k: v.clone() for k, v in state["ema"].items()}  # type: ignore[union-attr]
