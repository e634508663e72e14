"""World-size change between runs: 4 workers -> 2 -> 4, each stop in the middle of an epoch.

Every sample of an interrupted epoch's schedule is trained exactly once across the runs (proved
on the sample indices each rank traced), each global batch is the same sample set whatever the
world size, the steps continue without a gap, and so does the metric history. A world size
that does not divide the global batch is refused (exit 2) with the numbers named.
"""

from __future__ import annotations

import subprocess

import pytest

from ftrain.checkpoint import CheckpointStore
from ftrain.storage import Storage
from tests.harness.checkpoints import committed_steps, latest
from tests.harness.processes import ROOT, SMALL, base_env, launch_run_cmd, run_train
from tests.harness.traces import assert_epoch_exactly_once, read_trace, steps_once_per_rank

pytestmark = pytest.mark.slow

N, BATCH, SEED = 2048, 64, 0  # SMALL: 32 global batches per epoch, 2 epochs
STOPS = [(4, 20), (2, 40), (4, 0)]  # (world size, --max-steps; 0: to the end)


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """Three runs on one checkpoint dir: 4 workers to step 20 (epoch 1, batch 20), 2 workers
    to step 40 (epoch 2, batch 8), 4 workers to the end (step 64)."""
    root = tmp_path_factory.mktemp("worldsize")
    d = root / "ckpt"
    runs = []
    for i, (world, max_steps) in enumerate(STOPS):
        trace = root / f"trace{i}"
        r = run_train([*SMALL, "--checkpoint-dir", str(d), "--max-steps", str(max_steps),
                       "--trace-samples", str(trace)], nproc=world)
        assert r.returncode == 0, r.stderr[-3000:]
        runs.append((r, read_trace(trace), committed_steps(d)))
    return d, runs


def test_runs_continue_without_a_gap(chain):
    d, runs = chain
    (r0, t0, c0), (r1, t1, c1), (r2, t2, c2) = runs
    assert {x["world"] for x in t0} == {4} and {x["world"] for x in t1} == {2}
    assert {x["world"] for x in t2} == {4}
    assert [min(x["step"] for x in t) for t in (t0, t1, t2)] == [1, 21, 41]
    assert [max(x["step"] for x in t) for t in (t0, t1, t2)] == [20, 40, 64]
    assert c0[-1] == 20 and c1[-1] == 40 and c2[-1] == 64
    # Each global step is trained once: by every rank of the world that trained it.
    by_step: dict[int, set[tuple[int, int]]] = {}
    for x in t0 + t1 + t2:
        by_step.setdefault(x["step"], set()).add((x["world"], x["rank"]))
    assert sorted(by_step) == list(range(1, 65))
    for step, ranks in by_step.items():
        world = next(iter(ranks))[0]
        assert ranks == {(world, r) for r in range(world)}, f"step {step}: {sorted(ranks)}"
    steps_once_per_rank(t0)  # within a run, no rank repeats a step
    steps_once_per_rank(t1)
    steps_once_per_rank(t2)
    assert "allowed change: world size 4 -> 2 (per-rank batch 32)" in r1.stderr
    assert "allowed change: world size 2 -> 4 (per-rank batch 16)" in r2.stderr
    assert "resumed from" in r1.stderr and "step 20, batch 20 of epoch 1" in r1.stderr
    assert "step 40, batch 8 of epoch 2" in r2.stderr


def test_4_to_2_mid_epoch_every_sample_once(chain):
    _d, runs = chain
    lines = runs[0][1] + runs[1][1]
    assert {x["world"] for x in lines if x["epoch"] == 0} == {2, 4}  # epoch 1 spans both
    assert_epoch_exactly_once(lines, N, BATCH, SEED, epoch=0)


def test_2_to_4_mid_epoch_every_sample_once(chain):
    _d, runs = chain
    lines = runs[1][1] + runs[2][1]
    assert {x["world"] for x in lines if x["epoch"] == 1} == {2, 4}  # epoch 2 spans both
    assert_epoch_exactly_once(lines, N, BATCH, SEED, epoch=1)


def test_history_continues(chain):
    d, runs = chain
    final = latest(d)
    assert (final.manifest.step, final.manifest.epoch, final.manifest.world_size) == (
        64, 2, 4)
    hist = final.train_state["history"]
    assert [(h["epoch"], h["step"]) for h in hist] == [(1, 32), (2, 64)]
    # Epoch 1 was finished by the 2-worker run (its sums carried over the 4 -> 2 resume);
    # the 4-worker run kept that entry as it was.
    epoch_end = CheckpointStore(Storage(str(d))).load("step_0000000032")
    assert (epoch_end.manifest.world_size, epoch_end.train_state["history"]) == (2, hist[:1])
    assert all(0 < h["train_loss"] < 5 and 0 < h["train_acc"] <= 1 for h in hist)
    assert "epoch 1/2 done" in runs[1][0].stderr and "epoch 2/2 done" in runs[2][0].stderr


def test_world_size_not_dividing_the_batch_is_refused(chain):
    d, _runs = chain
    before = committed_steps(d)
    # Through the container entrypoint: torchrun alone would exit 1 for any worker failure.
    r = subprocess.run(launch_run_cmd([*SMALL, "--checkpoint-dir", str(d), "--epochs", "3"],
                                      nproc=3), cwd=ROOT, env=base_env(), capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 2, r.stderr[-3000:]
    assert "--batch-size 64 is not divisible by the world size 3" in r.stderr, r.stderr[-3000:]
    assert committed_steps(d) == before
