"""Process exit codes, for restart policies (Kubernetes podFailurePolicy, PyTorchJob ExitCode).

0 finished; 1-127 permanent (do not retry); 128-255 retryable.
"""

import atexit
import os
import sys
import threading
from typing import NoReturn

from ..errors import InputError  # noqa: F401 - raised throughout, mapped to INVALID

OK = 0
FAILED = 1  # an unexpected error (a bug or a broken environment): do not retry blindly
INVALID = 2  # invalid configuration, input data or checkpoint: fix the input, then rerun
INTERRUPTED = 130  # SIGINT (Ctrl-C) after an emergency checkpoint: rerun to resume
PREEMPTED = 143  # SIGTERM after an emergency checkpoint: rerun to resume
STORAGE_FAILED = 140  # checkpoints could not be written after retries: retry later
PEER_FAILED = 141  # another rank died or a collective timed out: restart the group

RETRYABLE_FLOOR = 128



def is_retryable(code: int) -> bool:
    return code >= RETRYABLE_FLOOR


EXIT_CODE_DIR_ENV = "FTT_EXIT_CODE_DIR"


def record(code: int) -> None:
    """Leave this worker's exit code in ``$FTT_EXIT_CODE_DIR`` (set by ``ftrain-run``, ftrain/launcher.py):
    torchrun exits 1 whatever its workers return, so a container entrypoint takes the code
    from here. One file per restart attempt and rank; a no-op when the variable is unset."""
    folder = os.environ.get(EXIT_CODE_DIR_ENV)
    if not folder:
        return
    name = (f"restart{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
            f"-rank{os.environ.get('RANK', '0')}.code")
    try:
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, name), "w") as fh:
            fh.write(f"{code}\n")
    except OSError:
        pass  # the record is advisory: never let it change the exit


def exit_now(code: int) -> NoReturn:
    """End the process with ``code`` once the command's main() has returned, without the
    interpreter's teardown of every module. With torch loaded (and torch._dynamo, which the
    first optimizer imports) that teardown costs about 0.8 s of CPU per process, paid by
    every worker at every exit and restart, and inside a preemption's grace period.

    What a normal exit does that matters still happens, in the same order: other non-daemon
    threads are waited for, the atexit handlers run (logging's flush, DataLoader's, torch's),
    and stdout and stderr are flushed. Every file the job writes is closed (and synced, for
    checkpoints) before main() returns."""
    # As the interpreter's own shutdown does, first the callbacks threading runs before it
    # joins threads: concurrent.futures' executors stop their idle workers there (torch
    # .compile leaves a thread pool whose workers would otherwise wait for work for ever).
    for callback in list(getattr(threading, "_threading_atexits", ())):
        callback()
    for thread in threading.enumerate():
        if thread is not threading.current_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed, or a pipe whose reader is gone
            pass
    os._exit(code)
