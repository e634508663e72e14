"""What a user supplies: a ``Task`` (model, datasets, loss with metric sums, optional hooks).

A task is chosen by an import string, ``--task package.module:attr``, where ``attr`` is a Task
instance, a Task subclass, or a factory returning one; a class or factory is called with the
task's arguments (``--task-args JSON`` or the YAML config's ``task:`` section) as keywords.
Checkpoints record the import string and the arguments, so ``ckpt export``, ``ckpt inspect``
and ``predict`` rebuild the same model given the same code on the path.

A task may declare options of its own (``Task.options``): flat options like the service's,
passed to it as arguments. The built-in image classification task (tasks/builtin/, the
default --task) is one task among others. docs/guide/tasks.md shows how to write one.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import json
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn
from torch.utils.data import Dataset

if TYPE_CHECKING:
    from ..config import Config

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
    ``loss(outputs, targets)`` returns the loss *summed* over the batch's items, or with
    ``loss_reduction = "mean"`` their mean (PyTorch's default); either way the gradients are
    those of the mean over the global batch, on any world size and with any ``--grad-accum``.
    It also returns a dict of named metric *sums* over the same items (sums in both cases).
    Sums are added up exactly across ranks, steps and restarts; ``metrics`` turns the epoch's
    totals into the numbers recorded in the history (``train_<name>`` / ``eval_<name>``).

    A misspelt declaration or hook (``scheduler_intervall``, Lightning's
    ``configure_optimizers``) is refused when training starts, naming the one it resembles.
    """

    #: Recorded in checkpoints and compared on resume: bump it when the data augmentation
    #: changes, so that a run cannot silently continue on different samples.
    augmentation: str = "none"

    #: What ``loss`` returns: "sum" over the batch's items (the default), or "mean" over them
    #: (``F.cross_entropy(out, y)``, ``F.nll_loss(out, y)`` as scripts write them).
    loss_reduction: str = "sum"

    #: When the schedule steps: "step", after every optimizer step (the default), or "epoch",
    #: once at every epoch's end after evaluation, as a script's ``scheduler.step()`` after its
    #: epoch loop (``StepLR(optimizer, step_size=1)``); exactly once per epoch across a resume.
    #: "epoch" needs the task's own ``configure_scheduler``.
    scheduler_interval: str = "step"

    #: ``ReduceLROnPlateau``: the history value it is stepped with at each epoch's end.
    scheduler_metric: str = "eval_loss"

    #: A function (or a method) that makes a batch from a list of ``(inputs, targets)``
    #: items, as a DataLoader's ``collate_fn`` does: padding variable-length sequences, say.
    #: With it, training batches come from a DataLoader too (not gathered on the device).
    collate_fn: Callable[[list[Any]], Any] | None = None

    #: The task's own options: a dataclass (subclass of TaskOptions) whose fields, made with
    #: ``ftrain.config.option``, are flat options like the service's own (``--name``, ``name:``
    #: in a YAML file, ``FTT_NAME``); their values become the task class's keyword arguments
    #: (``TaskOptions.args``), and ``--help`` lists them. None: ``--task-args`` only.
    options: ClassVar[type[TaskOptions] | None] = None

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
        """The LR schedule, stepped once per optimizer step (``scheduler_interval = "epoch"``:
        once per epoch; a ``ReduceLROnPlateau`` with ``scheduler_metric``). Default:
        ``--scheduler``."""
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

    def describe_model(self) -> dict[str, Any]:
        """Plain facts about the model (JSON values), recorded in every checkpoint's manifest
        as ``model_args``, which ``ckpt inspect`` shows."""
        return {}


@dataclass
class TaskOptions:
    """Base of a task's own options (``Task.options``): a dataclass of ``option`` fields."""

    def problems(self) -> list[str]:
        """Every invalid combination of values, each naming its flag and what to do."""
        return []

    def args(self) -> dict[str, Any]:
        """The task's keyword arguments for these values (recorded in checkpoints and compared
        on resume). Default: every field."""
        return dataclasses.asdict(self)


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


def script_target(obj: Any) -> str:
    """The import string of a class or function: ``package.module:attr``, or, for one defined
    in the script being run (``__main__``), ``/path/to/script.py:attr``, which the tools
    import from the file (its ``if __name__ == "__main__":`` keeps them from running it).
    Raises TaskError for a script without that guard: importing it would train again."""
    module = obj.__module__
    if module != "__main__":
        return f"{module}:{obj.__qualname__}"
    main = sys.modules["__main__"]
    path = getattr(main, "__file__", None)
    if not path or not path.endswith(".py"):
        where = path or "an interactive session"
        raise TaskError(f"the task {obj.__qualname__} is defined in {where}: the tools (ckpt "
                        "export, predict, load_model) cannot import it from there. Define it in "
                        "a module (a .py file next to your script) and import it")
    path = os.path.abspath(path)
    with open(path, encoding="utf-8", errors="replace") as fh:
        source = fh.read()
    if not re.search(r"""if\s+__name__\s*==\s*["']__main__["']""", source):
        raise TaskError(f"{path} defines the task {obj.__qualname__} and calls fit() when it is "
                        "imported: the tools import the script to rebuild the model, and would "
                        "train again. Put the call under `if __name__ == \"__main__\":`, or "
                        "define the task in a module of its own")
    return f"{path}:{obj.__qualname__}"


def _module_from_file(path: str) -> Any:
    """The module of a script named by its path: this process's ``__main__`` when it is that
    script (the run itself), else the script imported under a name of its own (the tools)."""
    path = os.path.abspath(path)
    main = sys.modules.get("__main__")
    if main is not None and os.path.abspath(getattr(main, "__file__", "") or "") == path:
        return main
    name = "ftrain_script_" + re.sub(r"\W", "_", path)
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"{path} is not a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def _import(target: str) -> Any:
    """The object an import string names (``package.module:attr``, or ``/path/file.py:attr``).
    Raises TaskError naming what failed."""
    module_name, _, attr = target.partition(":")
    if not module_name or not attr:
        raise TaskError(f"--task {target!r}: give an import string 'package.module:attr'")
    try:
        if module_name.endswith(".py"):
            if not os.path.exists(module_name):
                raise ImportError(f"no such file {module_name}")
            module = _module_from_file(module_name)
        else:
            module = importlib.import_module(module_name)
    except ImportError as e:
        raise TaskError(f"--task {target}: cannot import module {module_name!r} "
                        f"({type(e).__name__}: {e}). Install the package that provides it, or "
                        "run from the folder that holds it (or add that folder to PYTHONPATH)"
                        ) from None
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise TaskError(f"--task {target}: module {module_name!r} has no attribute "
                            f"{attr!r}") from None
    return obj


def options_class(target: str) -> type[TaskOptions] | None:
    """The options class of the task ``target`` names (a Task class or instance; a factory
    has none). Raises TaskError when it cannot be imported."""
    obj = _import(target)
    cls = type(obj) if isinstance(obj, Task) else obj
    return cls.options if isinstance(cls, type) and issubclass(cls, Task) else None


def load_task(ref: TaskRef) -> Task:
    """Import ``ref.target`` and build the task. Raises TaskError naming what failed."""
    obj = _import(ref.target)
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
    """The task this configuration trains and its arguments: its own options' values
    (``TaskOptions.args``), updated by --task-args."""
    options = options_class(cfg.task)
    args = options(**cfg.task_options).args() if options is not None else {}
    return TaskRef(cfg.task, {**args, **cfg.task_args})


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


def __getattr__(name: str) -> Any:
    # The built-in task lives in tasks/builtin/; checkpoints it wrote record it under this
    # package's name (the default --task), which must keep resolving.
    if name == "ImageClassification":
        from . import builtin

        return builtin.ImageClassification
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
