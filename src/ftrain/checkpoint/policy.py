"""Save policy: when to checkpoint, what goes into a checkpoint, and what a failed save means.

The loop makes one call per step, ``after_step``, and gets one decision back: go on, or stop
(a signal, --max-steps, storage failing, the epoch's end); a save that came due is taken (or
skipped while storage is busy) inside that call. The ranks' agreement on all of it is the
StopControl's, which the policy owns.

It is handed the objects to save (model, optimizer, schedule, task) and the run's fixed facts;
the trainer hands it the progress to record. ``save`` is collective: every rank calls it, rank
0's Checkpointer snapshots and persists in the background, and for a blocking save every rank
learns whether it committed. Under ``--parallel fsdp`` every rank has a ShardedCheckpointer and
snapshots its own shards of the model and optimizer (``get_state_dict``: DTensors, no
communication); the rest (schedule, scaler, RNG states, the task's state) is rank 0's.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..config import Config
from ..runtime.control import StopControl, StopSignals
from ..runtime.distributed import Collectives, DistInfo
from ..tasks import Task
from .format import MANIFEST, step_dirname
from .persister import Checkpointer, SaveTimeout, warn_saves_outpace_storage
from .store import UNEVALUATED, CheckpointStore

log = logging.getLogger(__name__)

# Copied into the manifest, so that tools list checkpoints without reading the train state.
MANIFEST_KEYS = ("epoch", "batch_in_epoch", "world_size", "global_batch_size", "seed",
                 "config_digest", "task")


# What the loop passes to have its progress recorded: a function returning the train state
# (with the unfinished epoch's sums). Collective unless every rank holds every rank's sums.
Progress = Callable[[], dict[str, Any]]


@dataclass(frozen=True)
class StepDecision:
    """What every rank does after a step: go on (``stop`` None), or stop for ``"preempt"``
    (a signal), ``"max"`` (--max-steps), ``"early"`` (early stopping after an evaluation) or
    ``"storage"`` (saves keep failing). ``epoch_end``:
    the epoch's last step (its save and a stop come after evaluation)."""

    stop: str | None = None
    epoch_end: bool = False


# The decision of almost every step, built once (a frozen dataclass takes a microsecond).
GO_ON = StepDecision()


class SavePolicy:
    def __init__(self, cfg: Config, info: DistInfo, coll: Collectives,
                 checkpointer: Checkpointer | None, store: CheckpointStore, model: nn.Module,
                 optimizer: torch.optim.Optimizer, scheduler: Any, task: Task,
                 meta: dict[str, Any], signals: StopSignals,
                 scaler: torch.amp.GradScaler | None = None) -> None:
        self.cfg, self.info, self.coll = cfg, info, coll
        self.ckpt = checkpointer  # rank 0's (ddp), every rank's (fsdp)
        self.store = store  # the checkpoints' root, on every rank (survivor_save)
        self.model, self.optimizer, self.scheduler, self.task = model, optimizer, scheduler, task
        self.scaler = scaler
        self.meta = meta  # fixed facts of the run, recorded in every checkpoint
        self.sharded = cfg.parallel == "fsdp"
        self.last_save_time = time.monotonic()
        self.abandoned = False  # a save that missed its deadline is still being written
        self.skipped = 0  # saves not snapshotted: storage was busy for a while yet
        self._last_due: float | None = None  # monotonic time of the previous due save
        self.due_interval_s = 0.0  # time between the two newest due saves
        # Rank 0's tracker: the newest step it holds for good (set by the monitor); every
        # rank learns it with the stop flags, a step late (``agreed_published``).
        self.tracker_published: Callable[[], int] = lambda: 0
        self.agreed_published = 0
        self._clock = info.is_main and cfg.save_every_seconds > 0  # timed saves, rank 0
        self.control = StopControl(coll, signals, self.local_flags)

    # ------------------------------------------------------------------ the loop's call
    def start_epoch(self) -> None:
        self.control.start_epoch()

    def after_step(self, step: int, last_batch: bool, progress: Progress,
                   evaluated: bool = False, early_stop: bool = False) -> StepDecision:
        """Collective, every rank, after every step: the one decision, and the save that came
        due (``progress`` is called only for it). ``evaluated``: the step was evaluated
        (under --keep-best a save follows, so that the evaluation has its checkpoint);
        ``early_stop``: the evaluation ended training (every rank computed the same)."""
        agreed = self.control.after_step()
        self.agreed_published = agreed.published
        if agreed.storage_failed:
            self.control.drain()
            return StepDecision("storage", last_batch)
        hit_max = bool(self.cfg.max_steps) and step >= self.cfg.max_steps
        if last_batch:  # the epoch end saves after evaluation; a stop is honoured there
            self.control.drain()
            return StepDecision("preempt" if agreed.preempt else "max" if hit_max else None,
                                True)
        if agreed.preempt or hit_max or early_stop:
            self.control.drain()
            return StepDecision("preempt" if agreed.preempt else "max" if hit_max else "early")
        if agreed.timed_save or self.step_due(step) or (evaluated and self.cfg.keep_best > 0):
            self.due()
            if agreed.storage_busy:
                self.skip(step)
            else:
                self.save(progress(), step, blocking=False,
                          reason="timed" if agreed.timed_save else "step")
        return GO_ON

    def end_epoch(self) -> None:
        """The epoch's batches ran out (a resume at its last batch): no exchange in flight."""
        self.control.drain()

    def agree_now(self):
        """A blocking agreement (at the epoch end: a signal may have come in evaluation)."""
        return self.control.agree_now()

    def signal_exit_code(self) -> int:
        return self.control.exit_code()

    def emergency_save(self, progress: Progress, step: int, reason: str) -> bool:
        """The checkpoint after a signal: no retries (the grace period is short, and a failed
        emergency checkpoint costs only the steps since the last committed one), bounded by
        what is left of --preemption-deadline. Whether it committed."""
        timeout = self.control.emergency_timeout(self.cfg.preemption_deadline)
        return self.save(progress(), step, blocking=True, reason=reason, timeout=timeout)

    @property
    def failed_in_a_row(self) -> int:
        """Saves that failed in a row (--max-failed-saves ends the run)."""
        if self.ckpt is None:  # another rank's count decided: it reached the limit
            return self.cfg.max_failed_saves
        return self.ckpt.consecutive_failures

    # ------------------------------------------------------------------ when
    def local_flags(self) -> list[int]:
        """This rank's part of the step's agreement (StopControl), every step: a timed save is
        due, saves keep failing, storage is busy, the step rank 0's tracker holds for good."""
        ckpt = self.ckpt
        failing = ckpt is not None and ckpt.consecutive_failures >= self.cfg.max_failed_saves
        return [int(self.timed_due()), int(failing), int(self.storage_busy()),
                self.tracker_published()]

    def step_due(self, step: int) -> bool:
        return bool(self.cfg.save_every_steps) and step % self.cfg.save_every_steps == 0

    def timed_due(self) -> bool:
        """Rank 0 keeps the clock; the ranks agree on it through StopControl."""
        return (self._clock
                and time.monotonic() - self.last_save_time >= self.cfg.save_every_seconds)

    def due(self) -> None:
        """A step or timed save came due (every rank, the same step): times the cadence."""
        now = time.monotonic()
        if self._last_due is not None:
            self.due_interval_s = now - self._last_due
        self._last_due = now

    def storage_busy(self) -> bool:
        """This rank's view, agreed through StopControl: the persist in flight needs more than
        two save intervals yet. A snapshot taken now would only be replaced by a newer one
        before storage takes it, so the next due save skips the copy (the loop's only cost
        of a save) and counts it as dropped; once storage is about to be free, saves snapshot
        again and the newest waits its turn. The persisted saves, and so the lost-work bound,
        are the ones that dropping superseded snapshots gives."""
        return (self.ckpt is not None and self.due_interval_s > 0
                and self.ckpt.persist_left_s() > 2 * self.due_interval_s)

    def skip(self, step: int) -> None:
        """A due save that storage_busy says to skip (collective decision, every rank)."""
        self.skipped += 1
        self.last_save_time = time.monotonic()  # a timed save comes due a period later
        if self.skipped == 1 and self.info.is_main and self.ckpt is not None:
            warn_saves_outpace_storage(self.ckpt.last_persist_s, self.due_interval_s,
                                       f"the save of step {step} is skipped while storage is "
                                       "busy")

    @property
    def dropped(self) -> int:
        """Due saves that storage never took: skipped while it was busy, or snapshots
        superseded by newer ones before their persist started."""
        return self.skipped + (self.ckpt.dropped if self.ckpt is not None else 0)

    def checkpoint_uri(self, step: int) -> str:
        """The URI of this run's checkpoint of ``step`` (committed or not)."""
        root = self.cfg.checkpoint_dir.rstrip("/") or self.cfg.checkpoint_dir
        return f"{root}/{step_dirname(step)}"

    @property
    def last_committed_step(self) -> int | None:
        return self.ckpt.last_committed_step if self.ckpt is not None else None

    # ------------------------------------------------------------------ what and how
    def save(self, progress: dict[str, Any], step: int, blocking: bool, reason: str,
             timeout: float | None = None) -> bool:
        """Collective. ``progress``: the trainer's state (epoch, step, sums, history);
        ``timeout``: a blocking save not done by then counts as failed (and is left running).
        Returns whether it committed (always True for a background save)."""
        self.last_save_time = time.monotonic()
        ok = True
        if self.ckpt is not None:
            train_state = dict(progress, **self.meta)
            facts = self._facts(train_state, reason)
            tensors = self._sharded() if self.sharded else self._tensors()
            try:
                result = self.ckpt.save(step, tensors, train_state, facts, blocking=blocking,
                                        timeout=timeout)
            except SaveTimeout as e:
                log.error("%s", e)
                self.abandoned = True
                result = False
            ok = bool(result) if blocking else True
        if blocking and self.info.is_distributed:
            ok = self.coll.agree_flags([0 if ok else 1])[0] == 0
        return ok

    def _facts(self, train_state: dict[str, Any], reason: str) -> dict[str, Any]:
        """What the manifest carries besides the files (Manifest.new), so that the tools list
        and inspect checkpoints without reading their train state."""
        facts = {k: train_state[k] for k in MANIFEST_KEYS}
        facts.update(model_args=self.meta.get("model_args"), reason=reason,
                     numerics=(self.meta.get("run") or {}).get("numerics"))  # rank 0's
        return facts

    def _tensors(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                **self._small()}

    def _small(self) -> dict[str, Any]:
        """Schedule, gradient scaler, the task's own state."""
        small: dict[str, Any] = {"scheduler": self.scheduler.state_dict()}
        if self.scaler is not None:
            small["scaler"] = self.scaler.state_dict()
        extra = self.task.state_dict()
        if extra:
            small["task"] = extra
        return small

    def _sharded(self) -> dict[str, Any]:
        """This rank's shards of model and optimizer (keyed by parameter names, so that they
        load on any world size) and, on rank 0, the small replicated state."""
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model, optimizer = get_state_dict(self.model, self.optimizer)
        return {"sharded": {"model": model, "optimizer": optimizer},
                "small": self._small() if self.info.is_main else None}

    def survivor_save(self, progress: dict[str, Any], step: int, unevaluated: bool
                      ) -> str | None:
        """After a peer died: checkpoint ``step`` from this rank alone, with no collective.
        Under DDP with the step exchange every rank holds the same state of ``step``
        (runtime/exchange.py), so any survivor's checkpoint is rank 0's. Rank 0 writes at once;
        another rank first waits a little for a commit of the step (rank 0 may be alive), then
        writes its own: the create-only manifest settles several writers, and nothing is
        half-written. Bounded by --preemption-deadline (torchrun stops the survivors soon
        after it sees the death). ``unevaluated``: the epoch's end before its evaluation (the
        resumed run evaluates it, and its checkpoint of the step replaces this one). Returns
        who committed the step ("this rank", or "another survivor": the same state), or None
        when it is not committed."""
        rank = self.info.rank
        deadline = time.monotonic() + self.cfg.preemption_deadline
        name = step_dirname(step)
        if self.ckpt is not None and self.ckpt.last_committed_step == step:
            return "this rank"  # committed just before the failure
        if rank:
            # Rank 0 first: it may be alive and writing; a rank further down waits longer.
            wait_until = min(time.monotonic() + 2.0 * rank, deadline)
            while time.monotonic() < wait_until:
                if self.store.storage.exists(f"{name}/{MANIFEST}"):
                    return "another survivor"
                time.sleep(0.05)
        ckpt = self.ckpt
        if ckpt is None:
            ckpt = Checkpointer(self.store, self.cfg.keep_last, self.cfg.orphan_grace_seconds)
            ckpt.is_main = False  # retention is the next run's rank 0's
        train_state = dict(progress, **self.meta)
        facts = self._facts(train_state, UNEVALUATED if unevaluated else "peer_failed")
        try:
            ok = bool(ckpt.save(step, self._tensors(), train_state, facts, blocking=True,
                                timeout=max(0.0, deadline - time.monotonic())))
        except SaveTimeout as e:
            log.error("%s", e)
            self.abandoned = True  # the write goes on in its thread; the process leaves
            return None
        if ckpt is not self.ckpt:
            ckpt.close()
        if not ok:
            return None
        return "this rank" if ckpt.committed_by_me(step) else "another survivor"

    def save_blocking(self, progress: dict[str, Any], step: int, reason: str) -> bool:
        """A save that must commit (final, --max-steps, epoch end before a stop): retried with
        backoff up to --max-failed-saves attempts."""
        if self.save(progress, step, blocking=True, reason=reason):
            return True
        for attempt in range(1, self.cfg.max_failed_saves):
            delay = min(30.0, 2.0 * 2 ** (attempt - 1))
            if self.info.is_main:
                log.warning("retrying the checkpoint in %.0fs (attempt %d/%d)", delay,
                            attempt + 1, self.cfg.max_failed_saves)
            time.sleep(delay)
            if self.save(progress, step, blocking=True, reason="retry"):
                return True
        return False

    def close(self) -> None:
        """Wait for the save in flight and stop the writer (rank 0). A save that missed its
        deadline (``abandoned``) is not waited for: the process is past its grace period
        already (the command line exits at once; fit() raises while the write goes on in its
        thread, a checkpoint without a manifest that no one reads)."""
        if self.ckpt is not None and not self.abandoned:
            self.ckpt.wait()
            self.ckpt.close()
