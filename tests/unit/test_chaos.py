"""The chaos tool's own rules, in-process: its storage flags are checked before any run, its
verdicts on attempts that storage failed, and the seeded share of random storage faults (chaos
runs as users run them: tests/system/test_chaos.py)."""

from __future__ import annotations

import sys

import pytest

from tests.harness import chaos
from tests.harness.s3lab import ACTIONS, RandomFaults


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
