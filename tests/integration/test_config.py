"""Config validation through the command line: a bad configuration exits 2 before any process
group exists (the layering and the checks in-process: tests/unit/test_config.py)."""

from __future__ import annotations

import subprocess

from tests.harness.processes import PY, ROOT, base_env


def test_cli_invalid_exits_2_before_any_process_group():
    r = subprocess.run([PY, "-m", "src.train", "--epochs", "0", "--batch-size", "-3",
                        "--optimizer", "adamw", "--scheduler", "cosine", "--keep-last", "0"],
                       cwd=ROOT, env=base_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "--epochs" in r.stderr and "--batch-size" in r.stderr and "--keep-last" in r.stderr
    assert "Traceback" not in r.stderr
