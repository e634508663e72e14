"""How training ends, for the loop: early stopping on the best metric (--early-stop-patience),
the exceptions a signal or failing storage end it with, and their log lines. When to stop is
the StopControl's and the SavePolicy's business; this says what stopping means."""

from __future__ import annotations

import logging
from typing import Any, NoReturn

from ..checkpoint.best import Selection
from ..checkpoint.format import TrainState
from ..checkpoint.policy import SavePolicy
from ..config import Config
from ..errors import InputError, Interrupted, Preempted
from ..runtime import exitcodes
from ..runtime.distributed import DistInfo
from ..storage import StorageError

log = logging.getLogger("ftrain.core.loop")


class Stopping:
    def __init__(self, cfg: Config, info: DistInfo, state: TrainState, saver: SavePolicy) -> None:
        self.cfg, self.info, self.state, self.saver = cfg, info, state, saver
        self.selection = Selection.from_config(cfg)  # --best-metric, early stopping

    def already_stopped(self) -> bool:
        """The train state says an earlier run stopped early: there is nothing to do."""
        st = self.state
        if st.stopped and self.info.is_main:
            log.info("training already stopped early at step %d (%s); nothing to do",
                     st.step, why(st.stopped))
        return bool(st.stopped)

    def early(self) -> bool:
        """After an evaluation: whether --early-stop-patience ends training here (the record
        of why goes into the train state, so the final checkpoint holds it)."""
        if self.selection is None:
            return False
        self.state.stopped = self.selection.should_stop(self.state.to_dict())
        return self.state.stopped is not None

    def log_early(self) -> None:
        if self.info.is_main:
            log.info("stopping early at step %d: %s; the final checkpoint is %s", self.state.step,
                     why(self.state.stopped), self.saver.checkpoint_uri(self.state.step),
                     extra={"fields": {"event": "early_stop", "step": self.state.step,
                                       **(self.state.stopped or {})}})

    def log_max_steps(self) -> None:
        if self.info.is_main:
            log.info("reached --max-steps %d at step %d; stopping", self.cfg.max_steps,
                     self.state.step)

    def check_best_metric(self, entry: dict[str, Any]) -> None:
        """An evaluation's entry holds --best-metric, or InputError names what it holds."""
        sel = self.selection
        if sel is not None and sel.metric not in entry:
            names = ", ".join(sorted(k for k in entry if k.startswith("eval_")))
            raise InputError(f"--best-metric {sel.metric}: the evaluation recorded no such "
                             f"metric; it has {names}")

    def on_signal(self, saved: bool) -> NoReturn:
        """Raise Preempted (SIGTERM) or Interrupted (SIGINT), after the emergency checkpoint
        (``saved``) or without it."""
        code = self.saver.signal_exit_code()
        stop = Interrupted if code == exitcodes.INTERRUPTED else Preempted
        step = self.state.step
        if saved:
            if self.info.is_main:
                log.warning("stopped at step %d after an emergency checkpoint; exit %d "
                            "(retryable): rerun the same command to resume", step, code)
            raise stop(f"stopped at step {step} after an emergency checkpoint", step, True,
                       checkpoint=self.saver.checkpoint_uri(step))
        abandoned = self.saver.abandoned
        last = self.saver.last_committed_step
        if self.info.is_main:
            log.error("EMERGENCY CHECKPOINT AT STEP %d %s; exiting %d (retryable) without it: "
                      "the rerun resumes from the newest committed checkpoint (%s)",
                      step, f"MISSED --preemption-deadline "
                      f"{self.cfg.preemption_deadline:g}s" if abandoned else "FAILED", code,
                      f"step {last}" if last is not None else "from an earlier run, if any",
                      extra={"fields": {"event": "emergency_checkpoint_missed", "step": step,
                                        "abandoned": abandoned, "exit_code": code,
                                        "last_committed_step": last}})
        # Abandoned: the write goes on in a thread; a partial checkpoint is invisible (no
        # manifest). The command line leaves at once (hard_exit), fit() raises.
        raise stop(f"stopped at step {step} without the emergency checkpoint", step, False,
                   abandoned, self.saver.checkpoint_uri(last) if last is not None else None)

    def storage_failed(self) -> NoReturn:
        failed = self.saver.failed_in_a_row
        text = (f"checkpoints failed {failed} times in a row (--max-failed-saves "
                f"{self.cfg.max_failed_saves})")
        if self.info.is_main:
            log.error("%s; exiting with %d (retryable) so the job restarts once storage is back",
                      text, exitcodes.STORAGE_FAILED)
        raise StorageError(text)


def why(stopped: dict[str, Any]) -> str:
    return (f"{stopped.get('metric')} did not improve on {stopped.get('best'):.6g} (step "
            f"{stopped.get('best_step')}) for {stopped.get('evaluations_since_best')} "
            f"evaluations, --early-stop-patience {stopped.get('patience')}")
