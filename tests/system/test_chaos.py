"""The chaos test tool, run as users run it: ``python -m launch.chaos``.

CI runs a short version (a handful of kills, 2 workers), on local disk, under --parallel fsdp,
and on S3 (moto's server behind the fault proxy) with 10% of storage requests failing. The long
runs (50 kills, 2 and 4 workers; 100 kills on faulty S3) are opt-in:
``pytest -m soak tests/system/test_chaos.py``. (The tool's own rules, in-process:
tests/unit/test_chaos.py.)
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.harness.processes import FSDP_CHAOS_EXTRA
from tests.harness.s3lab import ACTIONS

ROOT = Path(__file__).resolve().parents[2]


def run_chaos(workdir: Path, *args: str, reference: Path | None = None,
              timeout: float = 600) -> dict:
    cmd = [sys.executable, "-m", "launch.chaos", "--workdir", str(workdir)]
    if reference is not None:
        cmd += ["--reference", str(reference)]  # before ``args``: they may end in "-- flags"
    cmd += args
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    output = r.stdout[-6000:] + r.stderr[-3000:]
    assert r.returncode == 0, output
    assert "result       PASS" in r.stdout, output
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["result"] == "PASS" and not summary["problems"]
    return summary


def _shared(tmp_path_factory, *train_args: str) -> Path:
    """The reference run of a 2-worker, 4-kill chaos run with these training flags, shared with
    the tests that run the same command (tests/harness/chaos.shared_reference)."""
    from tests.harness import chaos

    args = chaos.effective_train_args(list(train_args), kills=4)
    return Path(chaos.shared_reference(tmp_path_factory, 2, args).folder)


@pytest.mark.soak  # opt-in since the default suite passed 20 minutes: test_fsdp.py kills too
def test_short_chaos_run_under_fsdp_passes(tmp_path, tmp_path_factory):
    # The kill plan of the S3 run below under --parallel fsdp (sharded checkpoints, emergency sharded
    # checkpoint on SIGTERM); shares its reference with tests/integration/test_fsdp.py (same command).
    summary = run_chaos(tmp_path, "--nproc", "2", "--kills", "4", "--seed", "1",
                        "--parallel", "fsdp", "--", *FSDP_CHAOS_EXTRA,
                        reference=_shared(tmp_path_factory, "--parallel", "fsdp",
                                          *FSDP_CHAOS_EXTRA))
    assert summary["parallel"] == "fsdp"
    assert summary["kills"] == 4
    assert set(summary["kills_by_kind"]) == {f"{s} {t}" for s in ("SIGKILL", "SIGTERM")
                                             for t in ("worker", "launcher")}
    assert summary["clean_preemptions"] > 0  # an emergency sharded checkpoint, no step lost
    assert summary["weights"].startswith("bitwise identical")
    assert summary["history"].startswith("identical")


@pytest.mark.slow
def test_short_chaos_run_against_faulty_s3_passes(tmp_path, tmp_path_factory):
    # The short ddp chaos run of CI: kills and storage faults together. The attempts
    # checkpoint to moto's server through the fault proxy, 10% of their requests failing; the
    # reference (shared with tests/integration/test_exact_resume.py, same command) stays on local disk.
    # (Chaos on local disk: the fsdp run above, and every kill test of test_exact_resume.py.)
    summary = run_chaos(tmp_path, "--nproc", "2", "--kills", "4", "--seed", "1",
                        "--storage", "s3", "--storage-faults", "0.1",
                        reference=_shared(tmp_path_factory))
    assert summary["kills"] == 4
    assert set(summary["kills_by_kind"]) == {f"{s} {t}" for s in ("SIGKILL", "SIGTERM")
                                             for t in ("worker", "launcher")}
    assert summary["weights"].startswith("bitwise identical")
    assert summary["history"].startswith("identical")
    storage = summary["storage"]
    assert storage["backend"].startswith("s3://ftrain-chaos/chaos")
    assert storage["requests"] > 100
    assert len(storage["faults"]) >= 3, storage  # several kinds, drawn from the seed
    assert storage["storage_retries"] > 0  # the job met them and retried


@pytest.mark.soak
def test_hundred_kills_against_faulty_s3(tmp_path):
    summary = run_chaos(tmp_path, "--nproc", "2", "--kills", "100", "--seed", "10",
                        "--storage", "s3", "--storage-faults", "0.1", timeout=6 * 3600)
    assert summary["kills"] == 100
    assert summary["weights"].startswith("bitwise identical")
    assert set(summary["storage"]["faults"]) == set(ACTIONS)


@pytest.mark.soak
@pytest.mark.parametrize("nproc", [2, 4])
def test_fifty_kills(tmp_path, nproc):
    summary = run_chaos(tmp_path, "--nproc", str(nproc), "--kills", "50", "--seed", str(nproc),
                        timeout=3 * 3600)
    assert summary["kills"] == 50
    assert set(summary["kills_by_signal"]) == {"SIGKILL", "SIGTERM"}
    assert summary["clean_preemptions"] > 0
