"""The gradient exchange question of issue 21, run as ``python -m launch.bench_comm`` (its
table: docs/development/benchmarks-cpu.md): at 3 ranks, DDP's own all-reduce resumes bitwise
once every counted step runs on the re-packed bucket layout, as ftrain's rank-order gather
does."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.harness.processes import ROOT, base_env


@pytest.mark.extended  # a measurement behind a design choice, not a promise of its own
def test_a_pinned_bucket_layout_resumes_an_all_reduce_bitwise_at_3_ranks():
    r = subprocess.run([sys.executable, "-m", "launch.bench_comm", "--world", "3"], cwd=ROOT,
                       env=base_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = {cells[0]: cells[1:] for line in r.stdout.splitlines()
            if line.startswith("| ") and not line.startswith("| exchange")
            for cells in [[c.strip() for c in line.strip("|").split("|")]]}
    assert set(rows) == {"allreduce", "allreduce-pinned", "gather"}, r.stdout
    assert rows["allreduce-pinned"][0] == "yes" and rows["gather"][0] == "yes", r.stdout
    assert all(float(rate) > 0 for _bitwise, rate in rows.values())
