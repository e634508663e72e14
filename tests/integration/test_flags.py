"""Options that were FTT_* variables before, given as flags in real runs."""

from __future__ import annotations

import pytest

from tests.harness.processes import SMALL, run_train


@pytest.mark.slow
def test_log_level_from_the_command_line(tmp_path):
    args = [*SMALL, "--model", "mlp", "--width", "8", "--depth", "1", "--epochs", "1",
            "--checkpoint-dir", str(tmp_path / "c")]
    r = run_train([*args, "--log-level", "WARNING"])
    assert r.returncode == 0, r.stderr[-2000:]
    assert " INFO " not in r.stderr and "training complete" not in r.stderr
    r = run_train([*args, "--epochs", "2", "--log-level", "DEBUG"])
    assert r.returncode == 0 and " DEBUG " in r.stderr, r.stderr[-2000:]
