"""What ``ftrain.fit`` raises, and the exit code the command line gives each (0 finished;
1-127 permanent: do not retry; 128-255 retryable).

- ``ConfigError`` (an ``InputError``): an invalid option, every problem listed. Exit 2.
- ``InputError``: bad data, task or checkpoint, or an incompatible resume. Exit 2.
- ``storage.StorageAccessError`` (no such bucket, access denied): exit 2;
  ``storage.StorageError``: storage failed after its retries, checkpoints included. Exit 140.
- ``PeerFailed``: another rank died or a collective timed out. Exit 141.
- ``Preempted``: SIGTERM; the emergency checkpoint is written unless ``saved`` is False.
  Exit 143.
- ``Interrupted`` (a ``KeyboardInterrupt``): Ctrl-C (SIGINT), after the emergency
  checkpoint. Exit 130.
"""

from __future__ import annotations


class FtrainError(Exception):
    """Base of ftrain's own errors; ``exit_code`` is what the command line exits with."""

    exit_code = 1


class InputError(FtrainError):
    """Bad input (data, task, checkpoint, incompatible resume): fix it, then rerun."""

    exit_code = 2


class PeerFailed(FtrainError):
    """Another rank died or a collective timed out: restart the group (retryable)."""

    exit_code = 141


class _Stopped:
    """A stop on a signal: at ``step``, with (``saved``) or without the emergency checkpoint
    (``abandoned``: its write missed --preemption-deadline and goes on in the background)."""

    def _init(self, step: int, saved: bool, abandoned: bool, checkpoint: str | None) -> None:
        self.step, self.saved, self.abandoned, self.checkpoint = step, saved, abandoned, checkpoint


class Preempted(FtrainError, _Stopped):
    """SIGTERM (a preemption, ``kubectl delete``, a node drain): rerun to resume."""

    exit_code = 143

    def __init__(self, message: str, step: int, saved: bool, abandoned: bool = False,
                 checkpoint: str | None = None) -> None:
        super().__init__(message)
        self._init(step, saved, abandoned, checkpoint)


class Interrupted(KeyboardInterrupt, _Stopped):
    """Ctrl-C (SIGINT); a KeyboardInterrupt, so that a notebook or a script stops as it
    would, after the emergency checkpoint."""

    exit_code = 130

    def __init__(self, message: str, step: int, saved: bool, abandoned: bool = False,
                 checkpoint: str | None = None) -> None:
        super().__init__(message)
        self._init(step, saved, abandoned, checkpoint)
