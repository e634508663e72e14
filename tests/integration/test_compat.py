"""Compatibility check on resume, in real runs: a different model, optimizer kind or seed is
refused (exit 2, the differing fields listed, nothing written); epochs, save cadence, world size
and loader workers may change, and each change is logged (the rules in-process:
tests/unit/test_compat.py)."""

from __future__ import annotations

import pytest

from tests.harness.checkpoints import committed_steps
from tests.harness.processes import SMALL, run_train

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cnn_sgd(tmp_path_factory):
    """A checkpoint of the default cnn/sgd job, single process, 6 steps."""
    d = tmp_path_factory.mktemp("compat") / "ckpt"
    r = run_train([*SMALL, "--checkpoint-dir", str(d), "--max-steps", "6"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert committed_steps(d) == [6]
    return d


def refused(d, *flags: str) -> str:
    r = run_train([*SMALL, "--checkpoint-dir", str(d), *flags])
    assert r.returncode == 2, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    assert "is incompatible with this run" in r.stderr
    assert committed_steps(d) == [6]  # nothing trained, nothing written
    return r.stderr


def test_model_change_is_refused(cnn_sgd):
    err = refused(cnn_sgd, "--model", "mlp")
    assert "--model: checkpoint 'cnn', now 'mlp'" in err
    assert "--width: checkpoint None, now 256" in err


def test_optimizer_kind_change_is_refused_with_every_field_listed(cnn_sgd):
    err = refused(cnn_sgd, "--optimizer", "adamw", "--scheduler", "step")
    assert "--optimizer: checkpoint 'sgd', now 'adamw'" in err
    assert "--scheduler: checkpoint 'cosine', now 'step'" in err


def test_seed_change_is_refused(cnn_sgd):
    """The data order, the initial weights and the synthetic data derive from the seed."""
    err = refused(cnn_sgd, "--seed", "1")
    assert "--seed: checkpoint 0, now 1" in err


def test_allowed_changes_are_logged(cnn_sgd):
    """Other epochs, save cadence, world size (1 -> 2) and loader workers: resumed, logged."""
    r = run_train([*SMALL, "--checkpoint-dir", str(cnn_sgd), "--epochs", "3",
                   "--save-every-steps", "4", "--num-workers", "1", "--max-steps", "8"], nproc=2)
    assert r.returncode == 0, r.stderr[-3000:]
    for change in ("world size 1 -> 2 (per-rank batch 32)", "--save-every-steps: 0 -> 4", "--num-workers: 0 -> 1",
                   "--max-steps: 6 -> 8"):
        assert f"resume: allowed change: {change}" in r.stderr, r.stderr[-3000:]
    assert "resume: applying --epochs 2 -> 3 (the LR schedule stretches" in r.stderr
    assert "resumed from" in r.stderr and "step 6" in r.stderr
    assert committed_steps(cnn_sgd)[-1] == 8


def test_lr_change_on_resume_warns_and_shows_in_the_next_checkpoint(cnn_sgd, tmp_path):
    import shutil

    d = tmp_path / "ck"
    shutil.copytree(cnn_sgd, d)
    nxt = str(committed_steps(d)[-1] + 1)
    r = run_train([*SMALL, "--checkpoint-dir", str(d), "--lr", "0.1", "--max-steps", nxt, "--epochs", "3"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resume: applying --lr 0.05 -> 0.1" in r.stderr
    assert "no longer bitwise-equal to an uninterrupted one" in r.stderr
    from ftrain.checkpoint import load_uri

    group = load_uri(str(d)).state["optimizer"]["param_groups"][0]
    assert group["initial_lr"] == 0.1
