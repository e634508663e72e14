"""The built-in task: image classification with a small BatchNorm CNN, an MLP or resnet18 on
the embedded synthetic data (no download), FashionMNIST, MNIST or CIFAR-10; cross-entropy and
accuracy. A task like any user's: its options are flat flags (--dataset, --model, ...) because
it declares them (``ImageOptions``), and nothing outside this package names it, but for the
default ``--task`` string its checkpoints record."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from ...config import flag, option
from .. import Task, TaskContext, TaskError, TaskOptions

DATASETS = ("synthetic", "fashion-mnist", "mnist", "cifar10")
MODELS = ("cnn", "mlp", "resnet18")


@dataclass
class ImageOptions(TaskOptions):
    dataset: str = option("synthetic", "Dataset to train on; 'synthetic' needs no download.",
                          DATASETS)
    model: str = option("cnn", "Model: small BatchNorm CNN, MLP (--width/--depth) or resnet18.",
                        MODELS)
    width: int = option(256, "Hidden width of the MLP model.")
    depth: int = option(2, "Number of hidden layers of the MLP model.")
    synthetic_train_size: int = option(12288, "Training samples of the synthetic dataset.")
    synthetic_test_size: int = option(2048, "Test samples of the synthetic dataset.")

    def problems(self) -> list[str]:
        p = [f"{flag(name)}: must be > 0, got {getattr(self, name)}"
             for name in ("width", "depth", "synthetic_train_size", "synthetic_test_size")
             if getattr(self, name) <= 0]
        if self.model == "resnet18" and self.dataset != "cifar10":
            p.append(f"{flag('model')}: resnet18 expects 32x32 colour input; use --dataset "
                     "cifar10")
        return p

    def args(self) -> dict[str, Any]:
        # Only what the chosen model and dataset use: the arguments are recorded in every
        # checkpoint and compared on resume, so an unused --width must not refuse one.
        args: dict[str, Any] = {"dataset": self.dataset, "model": self.model}
        if self.model == "mlp":
            args.update(width=self.width, depth=self.depth)
        if self.dataset == "synthetic":
            args.update(synthetic_train_size=self.synthetic_train_size,
                        synthetic_test_size=self.synthetic_test_size)
        return args


class ImageClassification(Task):
    """The built-in jobs: a small BatchNorm CNN, an MLP or resnet18 on the embedded synthetic
    data, FashionMNIST, MNIST or CIFAR-10; cross-entropy, accuracy."""

    options = ImageOptions

    def __init__(self, dataset: str = "synthetic", model: str = "cnn", width: int = 256,
                 depth: int = 2, synthetic_train_size: int = 12288,
                 synthetic_test_size: int = 2048) -> None:
        from .datasets import SPECS
        from .models import model_args

        if dataset not in SPECS:
            raise TaskError(f"--dataset {dataset!r} is not one of {', '.join(SPECS)}")
        spec = SPECS[dataset]
        self.dataset = dataset
        self.sizes = (synthetic_train_size, synthetic_test_size)
        self.model_args = model_args(model, spec.in_channels, spec.image_size, spec.num_classes,
                                     width, depth)
        self.loss_fn = nn.CrossEntropyLoss(reduction="sum")
        if dataset == "cifar10":
            from .datasets import AUGMENTATION_VERSION

            self.augmentation = AUGMENTATION_VERSION

    def build_model(self) -> nn.Module:
        from .models import build_model

        return build_model(self.model_args)

    def describe_model(self) -> dict[str, Any]:
        return self.model_args

    def prepare_data(self, ctx: TaskContext) -> None:
        if ctx.download and self.dataset != "synthetic":
            self.datasets(ctx)

    def datasets(self, ctx: TaskContext) -> tuple[Dataset, Dataset]:
        from .datasets import build_datasets

        return build_datasets(self.dataset, ctx.data_dir, ctx.download, ctx.seed, *self.sizes)

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loss_sum = self.loss_fn(outputs, targets)
        return loss_sum, {"loss": loss_sum.detach(), "acc": (outputs.argmax(1) == targets).sum()}


def legacy_task_args(old_config: dict[str, Any], model_args: dict[str, Any]) -> dict[str, Any]:
    """This task's arguments for a checkpoint written before tasks existed (it was the only
    job then): from its recorded configuration and model arguments."""
    args: dict[str, Any] = {"dataset": old_config.get("dataset", "synthetic"),
                            "model": model_args.get("name", old_config.get("model", "cnn"))}
    if args["model"] == "mlp":
        args.update(width=model_args.get("width", old_config.get("width")),
                    depth=model_args.get("depth", old_config.get("depth")))
    if args["dataset"] == "synthetic":
        args.update(synthetic_train_size=old_config.get("synthetic_train_size", 12288),
                    synthetic_test_size=old_config.get("synthetic_test_size", 2048))
    return args
