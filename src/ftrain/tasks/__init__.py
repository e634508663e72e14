"""What a user supplies: a ``Task`` (model, datasets, loss with metric sums, optional hooks).

A task is chosen by an import string, ``--task package.module:attr``, where ``attr`` is a Task
instance, a Task subclass, or a factory returning one; a class or factory is called with the
task's arguments (``--task-args JSON`` or the YAML config's ``task:`` section) as keywords.
Checkpoints record the import string and the arguments, so ``ckpt export``, ``ckpt inspect``
and ``predict`` rebuild the same model given the same code on the path.

The built-in jobs (``--model``, ``--dataset`` and their flags) are the task
``ftrain.tasks:ImageClassification``. docs/tasks.md shows how to write one.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils.data import Dataset

if TYPE_CHECKING:
    from ..config import Config

BUILTIN = "ftrain.tasks:ImageClassification"


class TaskError(Exception):
    """The task cannot be imported or built; the message names the import string or argument."""


@dataclass(frozen=True)
class TaskContext:
    """What a task may need to know about the run when it builds its datasets."""

    seed: int  # --seed: derive any data generation from it
    data_dir: str  # --data-dir (a local folder; remote ones are fetched into a local cache first)
    download: bool  # --download
    rank: int
    world_size: int
    local_rank: int


class Task:
    """Subclass it and implement ``build_model``, ``datasets`` and ``loss``; the rest is optional.

    Items of the datasets are ``(inputs, targets)``, each a tensor or a dict/tuple of tensors.
    ``loss(outputs, targets)`` returns the loss *summed* over the batch's items (the trainer
    divides by the global batch size, so gradients do not depend on the world size or on
    ``--grad-accum``) and a dict of named metric *sums* over the same items. Sums are added up
    exactly across ranks, steps and restarts; ``metrics`` turns the epoch's totals into the
    numbers recorded in the history (``train_<name>`` / ``eval_<name>``).
    """

    #: Recorded in checkpoints and compared on resume: bump it when the data augmentation
    #: changes, so that a run cannot silently continue on different samples.
    augmentation: str = "none"

    # ------------------------------------------------------------------ required
    def build_model(self) -> nn.Module:
        """A fresh model on the CPU. The RNGs are seeded before this is called."""
        raise NotImplementedError(f"{type(self).__name__}.build_model")

    def datasets(self, ctx: TaskContext) -> tuple[Dataset, Dataset]:
        """(train, eval) map-style datasets of ``(inputs, targets)`` items."""
        raise NotImplementedError(f"{type(self).__name__}.datasets")

    def loss(self, outputs: Any, targets: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(loss summed over the items, {metric name: sum over the items})."""
        raise NotImplementedError(f"{type(self).__name__}.loss")

    # ------------------------------------------------------------------ optional
    def forward(self, model: nn.Module, inputs: Any) -> Any:
        """Run the model on a batch's inputs (dict inputs: override to unpack them)."""
        return model(inputs)

    def metrics(self, sums: dict[str, float], items: int) -> dict[str, float]:
        """Epoch metrics from the epoch's sums over ``items`` items: by default each sum per
        item (a loss sum becomes the mean loss, a count of correct answers the accuracy)."""
        return {name: value / max(items, 1) for name, value in sums.items()}

    def predict(self, outputs: Any) -> torch.Tensor:
        """Predictions from the model's outputs, for ``predict`` (default: argmax of the last
        dimension)."""
        return outputs.argmax(-1)

    def prepare_data(self, ctx: TaskContext) -> None:
        """Called once per node (local rank 0) before any rank builds the datasets: download
        here."""

    def configure_optimizer(self, model: nn.Module, cfg: Config) -> torch.optim.Optimizer:
        """The optimizer (param groups are yours to choose). Default: ``--optimizer`` with
        ``--lr``, ``--momentum``, ``--weight-decay``."""
        return default_optimizer(model.parameters(), cfg)

    def configure_scheduler(self, optimizer: torch.optim.Optimizer, cfg: Config,
                            steps_per_epoch: int) -> torch.optim.lr_scheduler.LRScheduler:
        """The LR schedule, stepped once per optimizer step. Default: ``--scheduler``."""
        return default_scheduler(optimizer, cfg, steps_per_epoch)

    def after_step(self, model: nn.Module) -> None:
        """Called after every optimizer step (update an EMA here)."""

    def shard_units(self, model: nn.Module) -> list[nn.Module]:
        """``--parallel fsdp``: the submodules to shard as one unit each (``fully_shard``;
        each unit's parameters are gathered together for its forward and backward). The root
        is always a unit of its own, after these. Default: each top-level child that owns
        parameters, a container (Sequential, ModuleList, ModuleDict) replaced by its
        children, recursively."""
        return default_shard_units(model)

    def state_dict(self) -> dict[str, Any]:
        """Extra state of the task to checkpoint (tensors and plain values)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned."""


# ---------------------------------------------------------------------------- loading
@dataclass(frozen=True)
class TaskRef:
    """A task as checkpoints record it: its import string and its arguments."""

    target: str
    args: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {"import": self.target, "args": self.args}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TaskRef:
        return cls(str(d["import"]), dict(d.get("args") or {}))


def load_task(ref: TaskRef) -> Task:
    """Import ``ref.target`` and build the task. Raises TaskError naming what failed."""
    module_name, _, attr = ref.target.partition(":")
    if not module_name or not attr:
        raise TaskError(f"--task {ref.target!r}: give an import string 'package.module:attr'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise TaskError(f"--task {ref.target}: cannot import module {module_name!r} "
                        f"({type(e).__name__}: {e}). Install the package that provides it, or "
                        "run from the folder that holds it (or add that folder to PYTHONPATH)"
                        ) from None
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise TaskError(f"--task {ref.target}: module {module_name!r} has no attribute "
                            f"{attr!r}") from None
    if isinstance(obj, Task):
        if ref.args:
            raise TaskError(f"--task {ref.target} is a Task instance and takes no arguments; "
                            f"got --task-args {json.dumps(ref.args)}")
        return obj
    if not callable(obj):
        raise TaskError(f"--task {ref.target}: {type(obj).__name__} is neither a Task, a Task "
                        "class nor a factory")
    try:
        task = obj(**ref.args)
    except TypeError as e:
        raise TaskError(f"--task-args {json.dumps(ref.args)} do not fit --task {ref.target}: "
                        f"{e}") from None
    if not isinstance(task, Task):
        raise TaskError(f"--task {ref.target} returned a {type(task).__name__}, not an "
                        "ftrain.Task")
    return task


def task_ref(cfg: Config) -> TaskRef:
    """The task this configuration trains. The built-in task takes its arguments from the
    historical flags (--dataset, --model, ...), updated by --task-args."""
    args = cfg.task_args_dict()
    if cfg.task == BUILTIN:
        args = {**ImageClassification.args_from_config(cfg), **args}
    return TaskRef(cfg.task, args)


# ---------------------------------------------------------------------------- defaults
def default_optimizer(params: Any, cfg: Config) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum,
                               weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.momentum, 0.999),
                             weight_decay=cfg.weight_decay)


def default_scheduler(opt: torch.optim.Optimizer, cfg: Config, steps_per_epoch: int
                      ) -> torch.optim.lr_scheduler.LRScheduler:
    total = cfg.epochs * steps_per_epoch
    if cfg.scheduler == "step":
        return torch.optim.lr_scheduler.StepLR(opt, step_size=cfg.lr_step_epochs * steps_per_epoch,
                                               gamma=cfg.lr_gamma)
    if cfg.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
    if cfg.scheduler == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=total)
    return torch.optim.lr_scheduler.LambdaLR(opt, _constant)


def _constant(_step: int) -> float:
    return 1.0


_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def default_shard_units(model: nn.Module) -> list[nn.Module]:
    """Each top-level child of ``model`` that owns parameters; a container (Sequential,
    ModuleList, ModuleDict) is replaced by its children, recursively."""
    units: list[nn.Module] = []

    def visit(module: nn.Module) -> None:
        for child in module.children():
            if isinstance(child, _CONTAINERS):
                visit(child)
            elif any(True for _ in child.parameters()):
                units.append(child)

    visit(model)
    return units


# ---------------------------------------------------------------------------- built-in task
class ImageClassification(Task):
    """The built-in jobs: a small BatchNorm CNN, an MLP or resnet18 on the embedded synthetic
    data, FashionMNIST, MNIST or CIFAR-10; cross-entropy, accuracy."""

    def __init__(self, dataset: str = "synthetic", model: str = "cnn", width: int = 256,
                 depth: int = 2, synthetic_train_size: int = 12288,
                 synthetic_test_size: int = 2048) -> None:
        from .builtin.datasets import SPECS
        from .builtin.models import model_args

        if dataset not in SPECS:
            raise TaskError(f"--dataset {dataset!r} is not one of {', '.join(SPECS)}")
        spec = SPECS[dataset]
        self.dataset = dataset
        self.sizes = (synthetic_train_size, synthetic_test_size)
        self.model_args = model_args(model, spec.in_channels, spec.image_size, spec.num_classes,
                                     width, depth)
        self.loss_fn = nn.CrossEntropyLoss(reduction="sum")
        if dataset == "cifar10":
            from .builtin.datasets import AUGMENTATION_VERSION

            self.augmentation = AUGMENTATION_VERSION

    @staticmethod
    def args_from_config(cfg: Config) -> dict[str, Any]:
        args: dict[str, Any] = {"dataset": cfg.dataset, "model": cfg.model}
        if cfg.model == "mlp":
            args.update(width=cfg.width, depth=cfg.depth)
        if cfg.dataset == "synthetic":
            args.update(synthetic_train_size=cfg.synthetic_train_size,
                        synthetic_test_size=cfg.synthetic_test_size)
        return args

    def build_model(self) -> nn.Module:
        from .builtin.models import build_model

        return build_model(self.model_args)

    def prepare_data(self, ctx: TaskContext) -> None:
        if ctx.download and self.dataset != "synthetic":
            self.datasets(ctx)

    def datasets(self, ctx: TaskContext) -> tuple[Dataset, Dataset]:
        from .builtin.datasets import build_datasets

        return build_datasets(self.dataset, ctx.data_dir, ctx.download, ctx.seed, *self.sizes)

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loss_sum = self.loss_fn(outputs, targets)
        return loss_sum, {"loss": loss_sum.detach(), "acc": (outputs.argmax(1) == targets).sum()}

