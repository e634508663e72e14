"""Compatibility check on resume: a different model or optimizer kind is refused (exit 2, the
differing fields listed, nothing written); epochs, save cadence, world size and loader workers
may change, and each change is logged."""

from __future__ import annotations

import pytest

from ftrain.checkpoint import Loaded
from ftrain.config import load_config
from ftrain.models import model_args
from ftrain.train import compatibility_problems
from tests.helpers import SMALL, committed_steps, run_train

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
    assert "model (depth, name, width; set by --model/--width/--depth/--dataset)" in err
    assert "'name': 'cnn'" in err and "'name': 'mlp'" in err


def test_optimizer_kind_change_is_refused_with_every_field_listed(cnn_sgd):
    err = refused(cnn_sgd, "--optimizer", "adamw", "--scheduler", "step")
    assert "--optimizer: checkpoint 'sgd', now 'adamw'" in err
    assert "--scheduler: checkpoint 'cosine', now 'step'" in err


def test_allowed_changes_are_logged(cnn_sgd):
    """Other epochs, save cadence, world size (1 -> 2) and loader workers: resumed, logged."""
    r = run_train([*SMALL, "--checkpoint-dir", str(cnn_sgd), "--epochs", "3",
                   "--save-every-steps", "4", "--num-workers", "1", "--max-steps", "8"], nproc=2)
    assert r.returncode == 0, r.stderr[-3000:]
    for change in ("world size 1 -> 2 (per-rank batch 32)", "--epochs: 2 -> 3",
                   "--save-every-steps: 0 -> 4", "--num-workers: 0 -> 1", "--max-steps: 6 -> 8"):
        assert f"resume: allowed change: {change}" in r.stderr, r.stderr[-3000:]
    assert "resumed from" in r.stderr and "step 6" in r.stderr
    assert committed_steps(cnn_sgd)[-1] == 8


# ---------------------------------------------------------------------------- in-process
def config(*argv: str):
    return load_config(list(argv), environ={})


def _loaded(argv: list[str], world_size: int) -> tuple[Loaded, dict]:
    cfg = config(*argv)
    margs = model_args(cfg.model, 1, 28, 10, cfg.width, cfg.depth)
    ts = {"config": cfg.to_dict(), "config_digest": cfg.digest(), "model_args": margs,
          "world_size": world_size, "global_batch_size": cfg.batch_size}
    manifest = {k: ts[k] for k in ("config_digest", "model_args", "world_size",
                                   "global_batch_size")}
    return Loaded("step_0000000010", "mem://x/step_0000000010", manifest, {}, ts), margs


def test_batch_size_and_dividing_world_size():
    loaded, margs = _loaded(["--batch-size", "64"], world_size=4)
    refuse, allowed = compatibility_problems(config("--batch-size", "64"), loaded, margs, 2)
    assert refuse == [] and allowed == ["world size 4 -> 2 (per-rank batch 32)"]
    refuse, _ = compatibility_problems(config("--batch-size", "64"), loaded, margs, 3)
    assert refuse == ["world size 3 does not divide the global batch size 64; use a world size "
                      "that divides it"]
    refuse, _ = compatibility_problems(config("--batch-size", "128"), loaded, margs, 4)
    assert len(refuse) == 1 and refuse[0].startswith("--batch-size: checkpoint was trained with "
                                                     "global batch 64, now 128")


def test_digest_decides_when_no_config_was_recorded():
    loaded, margs = _loaded([], world_size=1)
    del loaded.train_state["config"]
    assert compatibility_problems(config(), loaded, margs, 1) == ([], [])
    refuse, _ = compatibility_problems(config("--optimizer", "adamw"), loaded, margs, 1)
    assert len(refuse) == 1 and refuse[0].startswith("config digest: checkpoint ")
