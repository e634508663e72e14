"""Training as a library call: ``ftrain.fit(task, config, **task_args) -> FitResult``. It
builds the Config from the flat option names, trains in this process (or as one torchrun
worker) through train.py, and leaves the caller's signal handlers, logging and deterministic
mode as they were."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from .checkpoint.format import TrainState
from .config import Config, config_from, options_of
from .errors import InputError
from .runtime.control import StopSignals
from .runtime.distributed import env_rank, launched_by_torchrun
from .runtime.monitor import setup_logging
from .tasks import Task, TaskError, script_target


@dataclass
class FitResult:
    """What ``ftrain.fit`` returns: where training ended."""

    step: int  # global optimizer steps done
    epoch: int  # epochs done
    history: list[dict[str, Any]]  # one entry per epoch: train_*, eval_*, lr, ...
    checkpoint: str | None  # the URI of the newest committed checkpoint (None: none)
    state: TrainState  # the whole train state (sums and position of an unfinished epoch)


def fit(task: str | Callable[..., Task] | Task, config: Config | dict[str, Any] | None = None,
        **task_args: Any) -> FitResult:
    """Train ``task`` from Python, in this process or as one torchrun worker; returns a
    FitResult. Raises ConfigError or InputError for bad input, Preempted (SIGTERM) or
    Interrupted (Ctrl-C, a KeyboardInterrupt) after the emergency checkpoint, StorageError,
    PeerFailed (ftrain.errors). The caller's signal handlers, logging and deterministic-mode
    setting are as they were when it returns or raises, so it can be called again.

    ``task``: an import string ``"package.module:attr"``, a Task class or factory (called with
    ``task_args``), or a Task instance. Checkpoints record the import string and the
    arguments, so that ``ckpt export``, ``predict`` and ``load_model`` can rebuild the model;
    a task defined in the script itself is recorded by the script's path (the call to fit()
    must then be under ``if __name__ == "__main__":``, or InputError says so at once).
    ``config``: a Config, or a mapping of its options by their flat names (``{"epochs": 3,
    "checkpoint_dir": ...}``, the task's own options too).
    """
    instance = task if isinstance(task, Task) else None
    if isinstance(task, str):
        target = task
    else:
        try:
            target = script_target(type(task) if instance is not None else task)
        except TaskError as e:
            raise InputError(str(e)) from None
    if instance is not None and task_args:
        raise TypeError("fit(): task_args go with a task class or factory, not an instance")
    if isinstance(config, Config):
        values = dataclasses.asdict(config)
        values["task_options"] = dict(config.task_options)
    else:
        values = dict(config or {})
    values["task"] = target
    if task_args:
        values["task_args"] = task_args
    options = type(instance).options if instance is not None else options_of(target)[0]
    cfg = config_from(values, options)
    from .train import train  # train.py imports FitResult from here

    with _as_a_library(cfg) as signals:
        return train(cfg, signals, instance)


@contextlib.contextmanager
def _as_a_library(cfg: Config) -> Iterator[StopSignals]:
    """Our logging, signal handlers and deterministic mode for the call, then the caller's."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    deterministic = torch.are_deterministic_algorithms_enabled()
    benchmark = torch.backends.cudnn.benchmark
    setup_logging(env_rank(), cfg.log_format, cfg.log_level)
    signals = StopSignals()
    main_thread = threading.current_thread() is threading.main_thread()
    if main_thread:  # signal handlers can only be set there
        # No watchdog that ends the process, unless a launcher supervises it: a notebook's
        # kernel must outlive a stuck emergency checkpoint.
        signals.install(hard_deadline_s=cfg.preemption_deadline + 30.0
                        if launched_by_torchrun() else None)
    try:
        yield signals
    finally:
        signals.restore()
        for handler in list(root.handlers):
            if handler not in handlers:
                root.removeHandler(handler)
                handler.close()
        for handler in handlers:
            if handler not in root.handlers:
                root.addHandler(handler)
        root.setLevel(level)
        torch.use_deterministic_algorithms(deterministic)
        torch.backends.cudnn.benchmark = benchmark
