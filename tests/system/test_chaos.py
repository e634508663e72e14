"""The chaos test tool, run as users run it: ``python -m launch.chaos``.

CI runs a short version (a handful of kills, 2 workers), on local disk, under --parallel fsdp,
and on S3 (moto's server behind the fault proxy) with 10% of storage requests failing. The long runs (50 kills, 2 and 4
workers; 100 kills on faulty S3) are opt-in: ``pytest -m soak tests/test_chaos.py``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.harness import chaos
from tests.harness.processes import FSDP_CHAOS_EXTRA
from tests.harness.s3lab import ACTIONS, RandomFaults

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


@pytest.mark.slow
def test_short_chaos_run_under_fsdp_passes(tmp_path, tmp_path_factory):
    # The kill plan of the S3 run below under --parallel fsdp (sharded checkpoints, emergency sharded
    # checkpoint on SIGTERM); shares its reference with tests/test_fsdp.py (same command).
    summary = run_chaos(tmp_path, "--nproc", "2", "--kills", "4", "--seed", "1",
                        "--parallel", "fsdp", "--", *FSDP_CHAOS_EXTRA,
                        reference=tmp_path_factory.getbasetemp() / "fsdp_reference")
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
    # reference (shared with tests/test_exact_resume.py, same command) stays on local disk.
    # (Chaos on local disk: the fsdp run above, and every kill test of test_exact_resume.py.)
    summary = run_chaos(tmp_path, "--nproc", "2", "--kills", "4", "--seed", "1",
                        "--storage", "s3", "--storage-faults", "0.1",
                        reference=tmp_path_factory.getbasetemp() / "reference")
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


def test_storage_flags_are_checked(tmp_path, monkeypatch, capsys):
    assert chaos.main(["--workdir", str(tmp_path), "--storage-faults", "0.1"]) == 2
    assert "with --storage s3" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "moto.server", None)  # as if moto were not installed
    assert chaos.main(["--workdir", str(tmp_path), "--storage", "s3"]) == 2
    assert "pip install -e '.[test]'" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # refused before any run


def test_an_unkilled_storage_exit_is_restarted_only_while_storage_fails_on_purpose(tmp_path):
    ref = chaos.Reference(str(tmp_path), 2, chaos.effective_train_args([], 1), "torch",
                          total_steps=64, steps_per_epoch=32)

    def judge(storage_faults: bool, worker_exits: list[int]) -> tuple[bool, list[str]]:
        run = chaos.Chaos(ref, tmp_path / "chaos", 0, 0, ["SIGKILL"], ["worker"], 0.5, 60.0,
                          storage_faults=storage_faults)
        run.attempts = [chaos.Attempt(0, rc=1, worker_exits=worker_exits),
                        chaos.Attempt(1, rc=0)]
        summary = chaos.summarize(run, {"problems": []}, 1.0, storage={} if storage_faults
                                  else None)
        return run.storage_exit(run.attempts[0]), summary["problems"]

    assert judge(True, [140, -15]) == (True, [])  # rank 0 gave up on storage; torchrun's TERM
    assert judge(True, [140, 141])[0]
    restarted, problems = judge(False, [140, -15])  # no faults injected: 140 is a failure
    assert not restarted and "attempt 0 failed (exit 1) without a kill" in problems
    restarted, problems = judge(True, [140, 1])  # a permanent exit is never excused
    assert not restarted and any("permanent codes [1]" in p for p in problems)


def test_a_sigterm_may_lose_steps_only_when_its_emergency_checkpoint_failed(tmp_path):
    ref = chaos.Reference(str(tmp_path), 2, chaos.effective_train_args([], 1), "torch",
                          total_steps=64, steps_per_epoch=32)

    def problems(storage_faults: bool, emergency_failed: bool) -> list[str]:
        run = chaos.Chaos(ref, tmp_path / "chaos", 1, 0, ["SIGTERM"], ["worker"], 0.5, 60.0,
                          storage_faults=storage_faults)
        kill = chaos.Kill("SIGTERM", "worker", "training", 1, 0, 5.0, 20)
        run.attempts = [chaos.Attempt(0, rc=1, kill=kill, trained=20, lost=17,
                                      worker_exits=[143, -15], emergency_failed=emergency_failed),
                        chaos.Attempt(1, rc=0)]
        summary = chaos.summarize(run, {"problems": []}, 1.0,
                                  storage={} if storage_faults else None)
        if storage_faults:
            assert summary["storage"]["sigterm_loss_waived"] == ([0] if emergency_failed else [])
        return summary["problems"]

    assert problems(True, True) == []  # logged, exited retryable: storage failed on purpose
    lost = ["attempt 0: SIGTERM lost 17 completed steps"]
    assert problems(True, False) == lost
    assert problems(False, True) == lost  # on healthy storage a failed emergency save is a bug


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


def test_random_faults_hit_a_seeded_share_of_matching_requests():
    def decisions(seed: int) -> list:
        rule = RandomFaults(0.1, seed=seed, delay=0.25, method="PUT")
        return [rule.decide(m, f"/bucket/step_{i}/state.pt") for i in range(3000)
                for m in ("PUT", "GET")]

    first = decisions(7)
    assert first == decisions(7) and first != decisions(8)  # reproducible from the seed
    fired = [d for d in first if d is not None]
    assert 240 <= len(fired) <= 360  # ~10% of the 3000 PUTs; no GET matches
    assert {action for action, _ in fired} == set(ACTIONS)
    assert {delay for _, delay in fired} == {0.25}
    with pytest.raises(ValueError, match="actions"):
        RandomFaults(0.1, actions=("teapot",))
