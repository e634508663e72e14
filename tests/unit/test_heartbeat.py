"""The heartbeat file a liveness probe reads (--heartbeat-file)."""

from __future__ import annotations

import os

from ftrain.runtime.monitor import Heartbeat


def test_beats_touch_the_file_at_most_once_an_interval_and_recreate_it(tmp_path, monkeypatch):
    """A small model beats thousands of times a second: only a beat an interval after the
    last touch sets the file's time. A file removed under the job is created again."""
    clock = [100.0]
    monkeypatch.setattr("ftrain.runtime.monitor.time.monotonic", lambda: clock[0])
    beat = Heartbeat(str(tmp_path / "probe" / "heartbeat"))
    path = tmp_path / "probe" / "heartbeat"
    assert path.read_text() == f"{os.getpid()}\n"
    os.utime(path, ns=(1, 1))
    for _ in range(100):
        beat.beat()
    assert path.stat().st_mtime_ns == 1  # within the interval of the creation: not touched
    clock[0] += Heartbeat.INTERVAL_S
    beat.beat()
    touched = path.stat().st_mtime_ns
    assert touched > 1
    os.utime(path, ns=(1, 1))
    clock[0] += Heartbeat.INTERVAL_S / 2
    beat.beat()
    assert path.stat().st_mtime_ns == 1
    path.unlink()
    clock[0] += Heartbeat.INTERVAL_S
    beat.beat()
    assert path.read_text() == f"{os.getpid()}\n"
