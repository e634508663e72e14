"""A task's declarations checked when training starts: a value that is not one of the known
ones, or a name that nearly matches a known declaration or hook (``scheduler_intervall``,
Lightning's ``configure_optimizers``), is refused with the name it resembles. A misspelt
declaration would otherwise be ignored silently, and the run would train something else."""

from __future__ import annotations

import difflib
import inspect
from typing import Any

import torch

from . import Task, TaskError

CHOICES = {"loss_reduction": ("sum", "mean"), "scheduler_interval": ("step", "epoch")}
# Hooks of other trainers that do nothing here: what to write instead.
FOREIGN = {"training_step": "loss (and forward)", "validation_step": "loss (evaluation uses it)",
           "test_step": "loss (evaluation uses it)", "configure_optimizers": "configure_optimizer",
           "lr_scheduler_step": "scheduler_interval",
           "compute_loss": "loss", "train_dataloader": "datasets", "val_dataloader": "datasets"}
# Shorter names than this are not compared: a task's own "metric" or "dataset" is not a typo
# of "metrics" or "datasets".
MIN_LENGTH = 8
SIMILAR = 0.85


def known_names() -> set[str]:
    return {name for name in dir(Task) if not name.startswith("_")}


def _own_names(task: Task) -> dict[str, str]:
    """Every public name the task's class (and its bases up to Task) or the instance defines,
    with where: "class attribute" or "attribute"."""
    out: dict[str, str] = {}
    for cls in type(task).__mro__:
        if cls in (Task, object):
            break
        for name in vars(cls):
            if not name.startswith("_"):
                out.setdefault(name, "method" if inspect.isfunction(vars(cls)[name])
                               else "class attribute")
    for name in vars(task):
        if not name.startswith("_"):
            out.setdefault(name, "attribute")
    return out


def check_declarations(task: Task) -> None:
    """Raise TaskError for a misspelt declaration or hook, or a declaration with a value that
    does nothing; names of the user's own that resemble none are left alone."""
    cls = type(task).__name__
    known = known_names()
    problems = []
    for name, kind in sorted(_own_names(task).items()):
        if name in known:
            continue
        if name in FOREIGN:
            problems.append(f"{cls}.{name} ({kind}) is another trainer's hook and is never "
                            f"called here; write {FOREIGN[name]} instead (docs/guide/tasks.md)")
            continue
        if len(name) < MIN_LENGTH:
            continue
        close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=SIMILAR)
        if close:
            problems.append(f"{cls}.{name} ({kind}) is not a Task declaration or hook: did you "
                            f"mean {close[0]!r}? As it is, it would be ignored; rename it")
    for name, choices in CHOICES.items():
        value = getattr(task, name)
        if value not in choices:
            problems.append(f"{cls}.{name} = {value!r}: use one of {', '.join(map(repr, choices))}")
    custom = type(task).configure_scheduler is not Task.configure_scheduler
    if task.scheduler_interval == "epoch" and not custom:
        problems.append(f"{cls}.scheduler_interval = 'epoch' needs the task's own "
                        "configure_scheduler: --scheduler's schedules count optimizer steps")
    if problems:
        raise TaskError("the task's declarations:\n  " + "\n  ".join(problems))


def check_scheduler(task: Task, scheduler: Any) -> None:
    """A ReduceLROnPlateau is stepped with a metric, once an epoch."""
    if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau) and \
            task.scheduler_interval != "epoch":
        raise TaskError(f"{type(task).__name__}.configure_scheduler returns a ReduceLROnPlateau: "
                        "declare scheduler_interval = 'epoch' (it is stepped with "
                        f"{task.scheduler_metric!r} after each evaluation)")
