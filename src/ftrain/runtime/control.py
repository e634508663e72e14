"""Stop control: signals, the ranks' agreement on stopping or saving, and the exit codes.

SIGTERM/SIGINT only set a flag. Each step every rank contributes its flags (a signal arrived,
a timed save is due, saves keep failing) to an asynchronous element-wise max, and reads the
result a step later, so agreeing costs no wait; every rank then acts on the same decision at
the same step boundary.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from . import exitcodes
from .distributed import Collectives

log = logging.getLogger(__name__)


class StopSignals:
    """SIGTERM/SIGINT set a flag; the loop agrees on it with the other ranks at the next step
    boundary and writes an emergency checkpoint. A second SIGINT aborts at once.

    ``install`` keeps the handlers it replaces and ``restore`` puts them back (``ftrain.fit``
    leaves the caller's process as it found it)."""

    def __init__(self) -> None:
        self.received: int | None = None
        self.received_at: float | None = None  # time.monotonic() of the first signal
        self.hard_deadline_s: float | None = 60.0
        self._previous: dict[int, Any] = {}
        self._watchdog: threading.Timer | None = None

    def install(self, hard_deadline_s: float | None = 60.0) -> None:
        """``hard_deadline_s``: after a signal, exit the process no matter what once this much
        time has passed (a peer that died mid-collective must not keep us past the grace
        period); None: never (a notebook's kernel must survive)."""
        self.hard_deadline_s = hard_deadline_s
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)

    def restore(self) -> None:
        """The handlers ``install`` replaced, back; a pending watchdog cancelled."""
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum: int, _frame: Any) -> None:
        if self.received == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if self.received is None:
            self.received = signum
            self.received_at = time.monotonic()
            log.warning("received %s: checkpointing at the next step boundary, then exiting",
                        signal.Signals(signum).name)
            if self.hard_deadline_s is not None:
                self._watchdog = threading.Timer(self.hard_deadline_s, self._give_up)
                self._watchdog.daemon = True
                self._watchdog.start()

    def _give_up(self) -> None:
        code = self.exit_code()
        log.error("no clean stop within %.0fs of the signal; exiting %d without waiting further",
                  self.hard_deadline_s, code)
        hard_exit(code)

    def exit_code(self) -> int:
        return exitcodes.INTERRUPTED if self.received == signal.SIGINT else exitcodes.PREEMPTED


def hard_exit(code: int) -> None:
    """Exit now, without waiting for threads (a write in flight, a hung collective)."""
    exitcodes.record(code)
    logging.shutdown()
    os._exit(code)


def ignore_stop_signals(_worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: leave SIGTERM/SIGINT to the training process. torchrun
    signals a worker's whole process group; a loader worker killed by it would crash the
    training process before its emergency checkpoint. (Loader workers still exit when the
    training process does.)"""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@dataclass(frozen=True)
class Decision:
    """What every rank agreed on."""

    preempt: bool
    timed_save: bool
    storage_failed: bool
    storage_busy: bool = False  # a due save skips its snapshot (SavePolicy.storage_busy)
    published: int = 0  # the newest step rank 0's tracker holds for good (Shadow)

    @classmethod
    def of(cls, agreed: list[int]) -> Decision:
        return cls(*(bool(x) for x in agreed[:4]), published=int(agreed[4]))


class StopControl:
    """The ranks' agreement on preemption, timed saves and failed storage.

    ``local_flags`` says, on this rank, whether a timed save is due, whether saves keep
    failing, whether storage is busy (only rank 0's saver knows, or under fsdp each rank's),
    and the newest step rank 0's tracker holds for good; the answers of all ranks are combined
    by an element-wise max.
    """

    def __init__(self, coll: Collectives, signals: StopSignals,
                 local_flags: Callable[[], list[int]]) -> None:
        self.coll = coll
        self.signals = signals
        self.local_flags = local_flags
        self._pending = None
        self._last_agreed: list[int] | None = None
        self._last_decision = Decision(False, False, False)

    def _flags(self) -> list[int]:
        return [int(self.signals.received is not None), *self.local_flags()]

    def start_epoch(self) -> None:
        """Start the pipelined agreement (one exchange in flight from here on)."""
        if self.coll.info.is_distributed:
            self._pending = self.coll.start_agree(self._flags())

    def after_step(self) -> Decision:
        """This step's flags go out; the decision is the one all ranks raised a step ago
        (this step's own, at world size 1)."""
        flags = self._flags()
        if self._pending is not None:
            agreed = self._pending.result()
            self._pending = self.coll.start_agree(flags)
        else:
            agreed = flags
        if agreed != self._last_agreed:  # mostly the same flags as the step before
            self._last_agreed, self._last_decision = agreed, Decision.of(agreed)
        return self._last_decision

    def drain(self) -> None:
        """Finish the exchange in flight (before any other collective)."""
        if self._pending is not None:
            self._pending.result()
            self._pending = None

    def agree_now(self) -> Decision:
        """A blocking agreement (at the epoch end, where a signal may have come during
        evaluation)."""
        return Decision.of(self.coll.agree_flags(self._flags()))

    # ------------------------------------------------------------------ exits
    def exit_code(self) -> int:
        return self.signals.exit_code()

    def emergency_timeout(self, deadline_s: float) -> float:
        """What is left of --preemption-deadline, counted from this rank's signal (from now
        when the signal reached another rank)."""
        start = self.signals.received_at or time.monotonic()
        return max(0.0, deadline_s - (time.monotonic() - start))
