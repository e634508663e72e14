"""Regression tests for defects found in review, in a real run: an unwritable checkpoint folder
(the others, in-process: tests/unit/test_review_fixes.py)."""

from __future__ import annotations

from tests.harness.processes import SMALL, run_train


def test_checkpoint_dir_that_is_a_file_exits_2_before_training(tmp_path):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    r = run_train([*SMALL, "--checkpoint-dir", str(not_a_dir / "sub")], nproc=0)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "--checkpoint-dir" in r.stderr and "cannot write there" in r.stderr
    assert "done: train loss" not in r.stderr
