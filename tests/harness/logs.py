"""What a job's log says, read back. Ours is read as the JSON events the product writes with
``--log-format json`` (FTT_LOG_FORMAT=json): one object per line with an ``event`` field on the
lines a program may act on (runtime/monitor.py's JsonFormatter). torchrun's failure report is
torchrun's own text, parsed as such."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

# torchrun's ChildFailedError report, once per failed worker:
#   rank      : 1 (local_rank: 1)
#   exitcode  : 143 (pid: 1234)
_FAILURE = re.compile(r"rank\s*:\s*(\d+) \(local_rank: \d+\)\s*\n\s*exitcode\s*:\s*(-?\d+)")
_EXITCODE = re.compile(r"exitcode\s*:\s*(-?\d+) \(pid: (\d+)\)")


def events(log: str, name: str | None = None) -> Iterator[dict[str, Any]]:
    """The JSON log events in ``log`` (every line that is one of our JSON objects; torchrun's
    lines, tracebacks and a line cut short by a kill are skipped), those named ``name`` only
    when it is given."""
    for line in log.splitlines():
        if not line.startswith("{"):
            continue
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict) and (name is None or event.get("event") == name):
            yield event


def torchrun_failures(log: str) -> dict[int, int]:
    """{rank: exit code} from torchrun's ChildFailedError report."""
    return {int(r): int(c) for r, c in _FAILURE.findall(log)}


def worker_exits(log: str) -> list[int]:
    """The exit code of every failed worker in torchrun's report, one per pid."""
    return list({pid: int(code) for code, pid in _EXITCODE.findall(log)}.values())


def slowest_save_s(log: str) -> float:
    """The longest save (snapshot to commit) the log reports, 0.0 when none committed."""
    return max((float(e["seconds"]) for e in events(log, "committed")), default=0.0)


def saves_failed(log: str) -> int:
    """Saves that failed after their retries."""
    return sum(1 for _ in events(log, "save_failed"))


def emergency_failed(log: str) -> bool:
    """Whether a SIGTERM's emergency checkpoint failed (rather than missed its deadline)."""
    return any(not e.get("abandoned") for e in events(log, "emergency_checkpoint_missed"))


def storage_retries(log: str) -> int:
    """Storage calls retried."""
    return sum(1 for _ in events(log, "retry"))


def epoch_done(log: str, epoch: int) -> bool:
    """Whether rank 0 logged epoch ``epoch`` (1-based) as done: its evaluation is over."""
    return any(e.get("epoch") == epoch for e in events(log, "epoch"))


def resumed(log: str) -> dict[str, Any] | None:
    """Rank 0's "resumed" event (uri, step, epoch, batch_in_epoch), None when it started
    afresh."""
    return next(events(log, "resumed"), None)
