"""Process exit codes, for restart policies (Kubernetes podFailurePolicy, PyTorchJob ExitCode).

0 finished; 1-127 permanent (do not retry); 128-255 retryable.
"""

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
