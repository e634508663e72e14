"""ftrain: fault-tolerant distributed training for PyTorch.

The public API: ``Task`` (what a user supplies), ``TaskContext``, ``Config`` and ``fit``.
docs/guide/tasks.md shows how to write a task.
"""

from typing import Any

from .config import Config, ConfigError
from .tasks import Task, TaskContext

__version__ = "0.1.0"
__all__ = ["Config", "ConfigError", "Task", "TaskContext", "fit"]


def __getattr__(name: str) -> Any:
    # Imported on first use: importing ftrain.train here would make `python -m ftrain.train`
    # (and -m ftrain.ckpt, -m ftrain.checkpoint.rules) find the module half-imported already.
    if name == "fit":
        from .train import fit

        return fit
    raise AttributeError(f"module 'ftrain' has no attribute {name!r}")
