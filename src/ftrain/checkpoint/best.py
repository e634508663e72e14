"""Model selection: the best checkpoints (--keep-best) and early stopping, both decided from the
run's committed history, never from a file a crash may have left.

Every evaluation is in the train state: the epoch ends' in ``history``, --eval-every-steps' in
``evals``, each with the step it evaluated. A checkpoint is a candidate when an evaluation was
made at its step (every evaluation is followed by a save while --keep-best is on). Retention
reads the scores from the train state it has just committed, so a restart, on any world size,
keeps the same checkpoints an uninterrupted run keeps, and only those of this run's steps.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Selection:
    """--best-metric, --best-mode, --keep-best, --early-stop-patience."""

    metric: str
    mode: str  # "min" or "max"
    keep: int = 0
    patience: int = 0

    @classmethod
    def from_config(cls, cfg: Any) -> Selection | None:
        """None when the run selects nothing (no --best-metric)."""
        if not cfg.best_metric:
            return None
        return cls(cfg.best_metric, resolved_mode(cfg.best_metric, cfg.best_mode),
                   cfg.keep_best, cfg.early_stop_patience)

    @classmethod
    def from_train_state(cls, train_state: dict[str, Any]) -> Selection | None:
        """The selection a checkpoint's run used (its recorded config), or None."""
        cfg = train_state.get("config") or {}
        metric = cfg.get("best_metric")
        if not metric:
            return None
        return cls(metric, resolved_mode(metric, cfg.get("best_mode", "auto")),
                   int(cfg.get("keep_best", 0)), int(cfg.get("early_stop_patience", 0)))

    def better(self, a: float, b: float) -> bool:
        """Whether score ``a`` is strictly better than ``b``."""
        return a < b if self.mode == "min" else a > b

    def scores(self, train_state: dict[str, Any]) -> list[tuple[int, float]]:
        """(step, value) of every evaluation that holds the metric, in step order."""
        return scores(train_state, self.metric)

    def ranked(self, train_state: dict[str, Any], present: Iterable[int]) -> list[int]:
        """The steps among ``present`` (committed checkpoints) that have a score, best first;
        of equal scores the earlier step ranks first (it was reached first)."""
        by_step = dict(self.scores(train_state))
        have = [s for s in set(present) if s in by_step and not math.isnan(by_step[s])]
        sign = 1.0 if self.mode == "min" else -1.0
        return sorted(have, key=lambda s: (sign * by_step[s], s))

    def keep_steps(self, train_state: dict[str, Any], present: Iterable[int]) -> set[int]:
        """The --keep-best steps among ``present``: at most ``keep``."""
        return set(self.ranked(train_state, present)[:self.keep]) if self.keep > 0 else set()

    def stale(self, train_state: dict[str, Any]) -> tuple[int, int | None, float | None]:
        """(evaluations since the best one, the best's step, its value)."""
        best_step, best, since = None, None, 0
        for step, value in self.scores(train_state):
            if best is None or self.better(value, best):
                best_step, best, since = step, value, 0
            else:
                since += 1
        return since, best_step, best

    def should_stop(self, train_state: dict[str, Any]) -> dict[str, Any] | None:
        """Early stopping: a record of why, once --early-stop-patience evaluations in a row
        did not improve on the best; else None."""
        if self.patience <= 0:
            return None
        since, best_step, best = self.stale(train_state)
        if since < self.patience:
            return None
        return {"reason": "early_stop", "metric": self.metric, "mode": self.mode,
                "patience": self.patience, "best_step": best_step, "best": best,
                "evaluations_since_best": since}


def resolved_mode(metric: str, mode: str) -> str:
    """--best-mode auto is min for a loss; anything else must be said (a wrong guess would
    keep the worst checkpoints)."""
    if mode in ("min", "max"):
        return mode
    if metric.endswith("loss"):
        return "min"
    raise ValueError(f"--best-mode: say min or max for --best-metric {metric} (auto is only "
                     "for a metric whose name ends in 'loss')")


def evaluations(train_state: dict[str, Any]) -> list[dict[str, Any]]:
    """Every evaluation the train state records (epoch ends and --eval-every-steps), in step
    order."""
    found = [e for e in train_state.get("history", []) if "step" in e]
    found += list(train_state.get("evals", []))
    return sorted(found, key=lambda e: int(e["step"]))


def scores(train_state: dict[str, Any], metric: str) -> list[tuple[int, float]]:
    return [(int(e["step"]), float(e[metric])) for e in evaluations(train_state)
            if isinstance(e.get(metric), (int, float))]


def metric_names(train_state: dict[str, Any]) -> list[str]:
    """The metrics an evaluation recorded (for a message naming what exists)."""
    names: set[str] = set()
    for e in evaluations(train_state):
        names.update(k for k in e if k.startswith("eval_"))
    return sorted(names)
