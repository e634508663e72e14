"""Peak memory (RSS) of this process over a phase of the job: a resume, a save.

With ``FTT_LOG_LEVEL=DEBUG`` every rank logs, for the resume and for each save it writes::

    memory: save of step 96: peak RSS 1034.2 MiB, +151.9 MiB over the 882.3 MiB before it

so that a user can see what a checkpoint costs each rank in memory (under ``--parallel fsdp``
about its own share of the state, never the whole state). The peak of a phase is the kernel's
high-water mark (``VmHWM`` in ``/proc/self/status``), reset to the current RSS when the phase
begins (``5`` written to ``/proc/self/clear_refs``, Linux 4.0 and later): so a DEBUG run also
lowers what ``getrusage`` reports as the process's maximum RSS. Phases may overlap (a save's
persist runs in the background while the next save snapshots): the mark reached so far is
credited to every open phase before it is reset. Off Linux, or when the mark cannot be reset,
nothing is measured and nothing is logged; at other log levels nothing is touched.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

MIB = 2**20


def usage() -> tuple[int, int] | None:
    """(RSS, peak RSS) of this process in bytes (VmRSS, VmHWM); None where /proc has neither."""
    try:
        with open("/proc/self/status") as fh:
            fields = dict(line.split(":", 1) for line in fh if line.startswith("Vm"))
        return int(fields["VmRSS"].split()[0]) * 1024, int(fields["VmHWM"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


class PeakRss:
    """Peak RSS over phases that may overlap, each named by a key. Does nothing unless
    ``enabled`` (the caller's logger is at DEBUG)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled and usage() is not None
        self._lock = threading.Lock()
        self._open: dict[Any, list[int]] = {}  # key -> [RSS at its start, peak so far]

    def start(self, key: Any) -> None:
        if not self.enabled:
            return
        with self._lock:
            now = usage()
            if now is None:
                return
            for phase in self._open.values():  # credit the mark so far before resetting it
                phase[1] = max(phase[1], now[1])
            if not _reset_peak():
                self.enabled = False
                self._open.clear()
                return
            rss = usage()
            self._open[key] = [rss[0] if rss else now[0], 0]

    def stop(self, key: Any) -> dict[str, float] | None:
        """The phase's figures in MiB (``rss_before``, ``peak``, ``increase``: peak minus
        rss_before), or None when it was not measured."""
        with self._lock:
            phase = self._open.pop(key, None)
            now = usage()
        if phase is None or now is None:
            return None
        before, peak = phase[0], max(phase[1], now[1])
        return {"rss_before": before / MIB, "peak": peak / MIB, "increase": (peak - before) / MIB}

    def log(self, key: Any, what: str, logger: logging.Logger) -> None:
        """Stop phase ``key`` and log its figures at DEBUG (``what`` names it), with the same
        figures as structured fields for JSON logs."""
        figures = self.stop(key)
        if figures is None:
            return
        fields = {"memory_phase": what, "peak_rss_mib": round(figures["peak"], 1),
                  "rss_before_mib": round(figures["rss_before"], 1),
                  "peak_increase_mib": round(figures["increase"], 1)}
        logger.debug("memory: %s: peak RSS %.1f MiB, %+.1f MiB over the %.1f MiB before it",
                     what, figures["peak"], figures["increase"], figures["rss_before"],
                     extra={"fields": fields})
