"""ftrain: fault-tolerant distributed training for PyTorch.

The public API:

- ``Task`` (what a user supplies), ``TaskContext``, ``TaskOptions`` and ``option`` (a task's
  own options);
- ``Config`` and ``ConfigError``;
- ``fit(task, config, **task_args) -> FitResult`` and the errors it raises (``errors``);
- ``load_model(uri, device)``: a checkpoint's model, rebuilt and loaded.

docs/guide/tasks.md shows how to write a task; docs/reference/python-api.md lists the API.
"""

from typing import Any

from .config import Config, ConfigError, option
from .errors import FtrainError, InputError, Interrupted, PeerFailed, Preempted
from .tasks import Task, TaskContext, TaskOptions

__version__ = "0.1.0"
__all__ = ["Config", "ConfigError", "FitResult", "FtrainError", "InputError", "Interrupted",
           "PeerFailed", "Preempted", "Task", "TaskContext", "TaskOptions", "fit", "load_model",
           "option"]


def __getattr__(name: str) -> Any:
    # Imported on first use: importing ftrain.api (and with fit() train.py) here would make
    # `python -m ftrain.train` (and -m ftrain.ckpt, -m ftrain.checkpoint.rules) find the module
    # half-imported already.
    if name in ("fit", "FitResult"):
        from . import api

        return getattr(api, name)
    if name == "load_model":
        from .ckpt import load_model

        return load_model
    raise AttributeError(f"module 'ftrain' has no attribute {name!r}")
