"""What a job's log says, read back: torchrun's failure report, the saves that committed or
failed, the storage retries. Each pattern is the one line the product writes, named here once."""

from __future__ import annotations

import re

# torchrun's ChildFailedError report, once per failed worker:
#   rank      : 1 (local_rank: 1)
#   exitcode  : 143 (pid: 1234)
_FAILURE = re.compile(r"rank\s*:\s*(\d+) \(local_rank: \d+\)\s*\n\s*exitcode\s*:\s*(-?\d+)")
_EXITCODE = re.compile(r"exitcode\s*:\s*(-?\d+) \(pid: (\d+)\)")
# ftrain.checkpoint: "checkpoint <uri> committed (<size> MiB, <seconds>s)", snapshot to commit.
_COMMITTED = re.compile(r"checkpoint \S+ committed \([\d.]+ MiB, ([\d.]+)s\)")
_EMERGENCY_FAILED = re.compile(r"EMERGENCY CHECKPOINT AT STEP \d+ FAILED")
# ftrain.storage: "<what> failed (<error>); retry 1/9 in 0.02s"
_RETRY = re.compile(r"\); retry \d+/\d+ in ")


def torchrun_failures(log: str) -> dict[int, int]:
    """{rank: exit code} from torchrun's ChildFailedError report."""
    return {int(r): int(c) for r, c in _FAILURE.findall(log)}


def worker_exits(log: str) -> list[int]:
    """The exit code of every failed worker in torchrun's report, one per pid."""
    return list({pid: int(code) for code, pid in _EXITCODE.findall(log)}.values())


def slowest_save_s(log: str) -> float:
    """The longest save (snapshot to commit) the log reports, 0.0 when none committed."""
    return max((float(x) for x in _COMMITTED.findall(log)), default=0.0)


def saves_failed(log: str) -> int:
    """Saves that failed after their retries ("SAVE FAILED")."""
    return log.count("SAVE FAILED")


def emergency_failed(log: str) -> bool:
    """Whether a SIGTERM's emergency checkpoint failed."""
    return _EMERGENCY_FAILED.search(log) is not None


def storage_retries(log: str) -> int:
    """Storage calls retried."""
    return len(_RETRY.findall(log))
