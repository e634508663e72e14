"""Peak RSS per phase (memory.py), the figures ``FTT_LOG_LEVEL=DEBUG`` logs for each resume
and save on every rank. The end-to-end use is in tests/system/test_memory.py (a sharded save and
resume never hold the whole state on one rank)."""

from __future__ import annotations

import gc
import logging
import mmap

import pytest

from ftrain.runtime import memory
from ftrain.runtime.memory import PeakRss
from ftrain.runtime.monitor import setup_logging

MIB = 2**20


def _touch(mib: int) -> None:
    """Make ``mib`` MiB of new pages resident for a moment, then give them back.

    An anonymous mapping of its own, each page written, so that the rise does not depend on what
    the allocator kept resident from earlier tests (CI once saw +0 MiB for a 32 MiB tensor)."""
    size = mib * MIB
    with mmap.mmap(-1, size) as block:
        for offset in range(0, size, mmap.PAGESIZE):
            block[offset] = 1


def test_overlapping_phases_each_get_their_own_peak():
    mem = PeakRss(True)
    if not mem.enabled or not memory._reset_peak():
        pytest.skip("no /proc/self/status or clear_refs here")
    # Garbage that earlier tests left in reference cycles must not be collected inside a phase:
    # a collection there frees memory while the phase touches its own, and the mark may not rise.
    gc.collect()
    gc.disable()
    try:
        mem.start("save 1")
        _touch(96)
        mem.start("save 2")  # resets the mark: "save 1" keeps the 96 MiB it saw
        _touch(32)
        first, second = mem.stop("save 1"), mem.stop("save 2")
    finally:
        gc.enable()
    assert first["increase"] > 90, first
    assert 28 < second["increase"] < 80, second
    assert first["peak"] - first["rss_before"] == pytest.approx(first["increase"])
    assert mem.stop("save 1") is None  # closed


def test_nothing_is_measured_or_logged_unless_enabled(caplog):
    mem = PeakRss(False)
    mem.start("resume")
    assert mem.stop("resume") is None
    with caplog.at_level(logging.DEBUG):
        mem.log("resume", "resume from step 1", logging.getLogger("test"))
    assert not caplog.records


def test_debug_logs_every_rank_and_other_levels_rank_0_alone(monkeypatch):
    root = logging.getLogger()
    saved = root.level, list(root.handlers)
    try:
        for level, rank, want in (("DEBUG", 1, logging.DEBUG), ("INFO", 1, logging.WARNING),
                                  ("INFO", 0, logging.INFO)):
            monkeypatch.setenv("FTT_LOG_LEVEL", level)
            setup_logging(rank)
            assert root.level == want, (level, rank)
    finally:
        root.setLevel(saved[0])
        root.handlers[:] = saved[1]
