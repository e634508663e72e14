"""When a peer dies: the survivors checkpoint the newest step they completed, alone.

A collective fails at once when a peer died (gloo: "Connection reset by peer"). Each survivor
still holds the whole state of the newest step it completed: under DDP with the step exchange
(runtime/exchange.py) every rank's parameters, optimizer, buffers (rank 0's) and the epoch's
metric sums of every rank arrived with that step's gradients; the RNG states and the data
position are derived from the step (core/rng.py). It checkpoints that step without any
collective (SavePolicy.survivor_save), then raises PeerFailed (exit 141, retryable): the
restart resumes at it and loses only the step in flight. Where it cannot, it says why and the
restart resumes from the newest committed checkpoint.

A peer that died during an evaluation loses nothing either: the step before it is
checkpointed, and the resumed run evaluates it (the epoch's end, from the position; one inside
the epoch, from the train state's evaluations: Trainer._eval_pending).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, NoReturn

from ..errors import PeerFailed

if TYPE_CHECKING:
    from .loop import Trainer

log = logging.getLogger(__name__)


def after_peer_failure(trainer: Trainer, error: RuntimeError) -> NoReturn:
    st = trainer.state
    text = f"a peer failed or a collective timed out: {str(error)[:300]}"
    why = cannot_save_alone(trainer)
    if why is None:
        running = time.perf_counter() - trainer.epoch_t0 if st.batch_in_epoch else 0.0
        trainer.p.exchange.restore_buffers()  # the step in flight's forward pass changed them
        unevaluated = st.batch_in_epoch == trainer.steps_per_epoch
        by = trainer.saver.survivor_save(trainer.progress(running), st.step, unevaluated)
        if by is not None:
            log.warning("a peer failed after step %d: step %d checkpointed by %s; exiting %d "
                        "(retryable)", st.step, st.step, by, PeerFailed.exit_code,
                        extra={"fields": {"event": "survivor_checkpoint", "step": st.step,
                                          "rank": trainer.info.rank, "by": by}})
            raise PeerFailed(f"{text}; step {st.step} checkpointed by the survivors") from error
        why = "the checkpoint failed"
    last = trainer.saver.last_committed_step
    log.error("a peer failed after step %d: not checkpointed (%s); the restart resumes from "
              "the newest committed checkpoint%s", st.step, why,
              f" (step {last})" if last is not None else "",
              extra={"fields": {"event": "survivor_checkpoint_missed", "step": st.step,
                                "reason": why}})
    raise PeerFailed(text) from error


def cannot_save_alone(trainer: Trainer) -> str | None:
    """Why this rank cannot checkpoint the newest step without its peers, or None."""
    if trainer.cfg.parallel == "fsdp":
        return "under --parallel fsdp each rank holds only its shards; the dead rank's are gone"
    if trainer.p.exchange is None:
        return "on GPU the survivors do not checkpoint yet (a dead peer hangs NCCL; unverified)"
    if trainer.state.step == trainer.start_step:
        return "no step was trained since the checkpoint this run resumed from"
    if trainer.saver.abandoned:
        return "an emergency checkpoint is still being written"
    return None
