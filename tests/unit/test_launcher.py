"""``ftrain-run`` (ftrain.launcher), the container entry point: the exit code it chooses from
torchrun's and the workers' records, and which records it reads (the entry point under real
preemptions: tests/integration/test_preemption.py)."""

from __future__ import annotations

import signal

import pytest

from ftrain.launcher import choose_exit, read_records


@pytest.mark.parametrize("torchrun, records, forwarded, want", [
    (0, {0: 143}, None, 0),  # torchrun finished: done
    (1, {0: 143, 1: 143}, signal.SIGTERM, 143),  # preempted after the emergency checkpoint
    (1, {0: 141, 1: 2}, None, 2),  # a permanent code wins over a retryable one
    (1, {0: 141, 1: 140}, None, 141),  # else the lowest rank's retryable code
    (1, {}, signal.SIGTERM, 143),  # workers gone without a record, after our SIGTERM
    # No record and no signal: torchrun failed before any worker recorded (rendezvous timed
    # out or unreachable, a worker OOM-killed): retryable, unlike a worker's own exit 1.
    (1, {}, None, 141),
    (2, {}, None, 2),  # torchrun's usage error
    (-9, {}, None, 137),  # torchrun itself SIGKILLed
    (1, {0: 0, 1: 0}, None, 0),  # every local worker finished
])
def test_launch_run_exit_code(torchrun, records, forwarded, want):
    assert choose_exit(torchrun, records, forwarded) == want


def test_launch_run_reads_the_newest_attempt(tmp_path):
    for name, code in (("restart0-rank0.code", "141"), ("restart0-rank1.code", "141"),
                       ("restart1-rank0.code", "143"), ("restart1-rank1.code", "garbage"),
                       ("other.txt", "2")):
        (tmp_path / name).write_text(code + "\n")
    assert read_records(str(tmp_path)) == (1, {0: 143})
    assert read_records(str(tmp_path / "missing")) == (None, {})
