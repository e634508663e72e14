"""The README's quick start runs for real, and ends bitwise equal to the same command run
without the kill (the documentation's other checks, in-process: tests/unit/test_docs.py)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.harness.checkpoints import assert_bitwise_equal
from tests.harness.markdown import blocks, logical_lines
from tests.harness.processes import ROOT, base_env, export_weights


def quickstart() -> str:
    found = [lines for lang, _first, lines, marker in blocks(ROOT / "README.md")
             if marker == "quickstart"]
    assert len(found) == 1 and found[0], "README.md: one ```bash block after <!-- quickstart -->"
    return "\n".join(found[0]) + "\n"


@pytest.mark.slow
def test_readme_quickstart_kills_and_resumes(tmp_path):
    script = tmp_path / "quickstart.sh"
    script.write_text(quickstart())
    env = base_env({"PATH": f"{Path(sys.executable).parent}:{base_env()['PATH']}"})
    r = subprocess.run(["bash", "-e", str(script)], cwd=tmp_path, env=env, text=True,
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=300)
    out = r.stdout
    assert r.returncode == 0, out
    assert "stopped at step" in out and "after an emergency checkpoint" in out, out
    assert "exit 143" in out, out
    assert re.search(r"resumed from \./quickstart/step_\d{10}", out), out
    assert "training complete: 2 epochs, 2048 steps" in out, out
    assert re.search(r"\b2048\s+2\s.*\bvalid\s+step_0000002048", out), out

    # "The final weights are bitwise those of the same command run without the kill."
    rerun = [text for _n, text in logical_lines(quickstart().splitlines(), 1)
             if text.startswith("python -m ftrain.train") and not text.rstrip().endswith("&")]
    assert len(rerun) == 1, rerun
    plain = tmp_path / "plain"
    plain.mkdir()
    r = subprocess.run(["bash", "-e", "-c", rerun[0]], cwd=plain, env=env, text=True,
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=300)
    assert r.returncode == 0, r.stdout
    assert_bitwise_equal(export_weights(str(tmp_path / "quickstart"), tmp_path / "a.pth"),
                         export_weights(str(plain / "quickstart"), tmp_path / "b.pth"))
