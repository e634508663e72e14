"""The container entry point, installed as ``ftrain-run``: torchrun, exiting with its workers'
exit code.

    ftrain-run --nproc_per_node=4 --shutdown-timeout=45 -m ftrain.train [options]
    python -m ftrain.launcher ...                        (the same, without the console script)

Every argument goes to torchrun unchanged. torchrun itself exits 1 whatever its workers return
(and on SIGTERM it dies with a traceback, also 1), so a restart policy could not tell a
preemption (retryable, 143) from bad input (2). Each worker leaves its exit code in
``$FTT_EXIT_CODE_DIR`` (``ftrain.runtime.exitcodes.record``); this wrapper exits with the one that matters:

- torchrun exited 0: 0.
- Else, among the records of the newest restart attempt: the lowest rank's permanent code
  (1-127) if there is one, else the lowest rank's retryable code (128-255), else 0 (every local
  worker finished).
- No record (workers killed before they could write one): 128 + the signal this wrapper
  forwarded (SIGTERM: 143), or 128 + the signal that killed torchrun; else, when torchrun
  failed (1) before any worker recorded a code, 141 (retryable): its rendezvous timed out or
  could not reach the endpoint (another node not up yet, node 0 gone), or a worker was killed
  without a record (the OOM killer's SIGKILL). A restart is what helps there; the Job's
  backoffLimit bounds the retries. torchrun's usage error (2) stays 2.

The first SIGTERM, SIGINT and SIGHUP are forwarded to torchrun, which forwards them to the
workers and SIGKILLs them after ``--shutdown-timeout`` seconds (default 30). Repeats are not
forwarded: a second signal would make torchrun abandon that wait. Kubernetes sends SIGTERM to
the container's PID 1, which should be this wrapper (exec form, not ``sh -c``) or tini running
it. It also sets TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (unless set): with c10d rendezvous each
restart round then gets a fresh worker store.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile

from .runtime.exitcodes import EXIT_CODE_DIR_ENV, PEER_FAILED, RETRYABLE_FLOOR

FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
_RECORD = re.compile(r"^restart(\d+)-rank(\d+)\.code$")


def read_records(folder: str) -> tuple[int | None, dict[int, int]]:
    """(newest restart attempt, {rank: exit code}) from the workers' records in ``folder``."""
    attempts: dict[int, dict[int, int]] = {}
    try:
        names = os.listdir(folder)
    except OSError:
        return None, {}
    for name in names:
        m = _RECORD.match(name)
        if not m:
            continue
        try:
            with open(os.path.join(folder, name)) as fh:
                code = int(fh.read().strip())
        except (OSError, ValueError):
            continue
        attempts.setdefault(int(m.group(1)), {})[int(m.group(2))] = code
    if not attempts:
        return None, {}
    newest = max(attempts)
    return newest, attempts[newest]


def choose_exit(torchrun_code: int, records: dict[int, int], forwarded: int | None) -> int:
    """The wrapper's exit code (see the module docstring)."""
    if torchrun_code == 0:
        return 0
    by_rank = [records[r] for r in sorted(records)]
    permanent = [c for c in by_rank if 0 < c < RETRYABLE_FLOOR]
    if permanent:
        return permanent[0]
    retryable = [c for c in by_rank if c >= RETRYABLE_FLOOR]
    if retryable:
        return retryable[0]
    if by_rank:
        return 0
    if forwarded is not None:
        return RETRYABLE_FLOOR + forwarded
    if torchrun_code < 0:
        return RETRYABLE_FLOOR - torchrun_code
    if torchrun_code == 1:
        return PEER_FAILED
    return torchrun_code


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0
    folder = tempfile.mkdtemp(prefix="ftt-exit-")
    env = dict(os.environ, **{EXIT_CODE_DIR_ENV: folder})
    # c10d rendezvous: a fresh worker store per round, so a restarted group never reads the
    # dead group's keys (the workers guard against the shared agent store themselves too).
    env.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    forwarded: list[int] = []
    proc: subprocess.Popen | None = None

    def forward(signum: int, _frame) -> None:
        if signum in forwarded:
            return
        forwarded.append(signum)
        print(f"ftrain-run: got {signal.Signals(signum).name}; forwarding it to torchrun",
              file=sys.stderr, flush=True)
        if proc is not None:
            proc.send_signal(signum)

    for sig in FORWARDED:
        signal.signal(sig, forward)
    try:
        # A session of its own: a terminal's Ctrl-C reaches torchrun once (through us), not
        # twice; a second SIGINT would make torchrun abandon its wait for the workers.
        proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *argv], env=env,
                                start_new_session=True)
        for sig in forwarded:  # arrived while torchrun was starting
            proc.send_signal(sig)
        torchrun_code = proc.wait()
        attempt, records = read_records(folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    code = choose_exit(torchrun_code, records, forwarded[0] if forwarded else None)
    workers = ", ".join(f"rank {r}: {c}" for r, c in sorted(records.items())) or "none recorded"
    print(f"ftrain-run: torchrun exited {torchrun_code}; worker exit codes (restart "
          f"{attempt if attempt is not None else '-'}): {workers}; exiting {code}",
          file=sys.stderr, flush=True)
    return code


def cli() -> None:
    """Console script ``ftrain-run`` and ``python -m ftrain.launcher``."""
    sys.exit(main())


if __name__ == "__main__":
    cli()
