"""--tracker mlflow and wandb against real stores (MLflow's own client on a local SQLite
database; W&B in offline mode, its run files read back): a job SIGKILLed twice, each time after
training steps it never committed, is one run in the tracker whose every metric has the same
steps, values and count as an uninterrupted run's; no secret reaches the tracker. With MLflow,
rank 0 alone is SIGKILLed first: the survivor's checkpoint carries the points rank 0 had not
published yet."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from ftrain.checkpoint import step_dirname
from tests.harness.checkpoints import committed_steps
from tests.harness.processes import (
    kill_group,
    kill_leftovers,
    run_train,
    start_train,
    wait_for,
)
from tests.harness.stores import die_after_env, held_commit_env

pytestmark = pytest.mark.slow

SECRET = "S3CR3T-d0-not-leak"
ARGS = ["--model", "mlp", "--synthetic-train-size", "2048", "--batch-size", "64",
        "--epochs", "3", "--save-every-steps", "8", "--save-every-seconds", "0",
        "--log-every-steps", "4", "--eval-every-steps", "16",
        "--storage-options", json.dumps({"secret_token": SECRET})]
TIMING = ("samples_per_s", "seconds", "saves_dropped")  # wall-clock: legitimately differ


def _train_killed_twice(args: list[str], tmp_path: Path, env: dict[str, str]) -> str:
    """Attempts 1 and 2 are SIGKILLed once they trained past a step whose commit is held
    (steps 40 and 72: the points of the steps after 32 and 64 are lost with them); attempt 3
    runs to the end. Returns the last attempt's stderr."""
    ckpt_dir = args[args.index("--checkpoint-dir") + 1]
    for n, held in enumerate((40, 72)):
        mark = tmp_path / f"held-{n}"
        log = tmp_path / f"attempt-{n}.log"
        proc = start_train(args, nproc=2, log_path=log,
                           env=held_commit_env(step_dirname(held), mark, env))
        try:
            assert wait_for(mark.exists, 240, while_=lambda p=proc: p.poll() is None), \
                log.read_text()[-3000:]
            kill_group(proc, signal.SIGKILL)
            proc.wait(timeout=60)
        finally:
            kill_leftovers(str(tmp_path))
        assert held not in committed_steps(ckpt_dir)
    r = run_train(args, nproc=2, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stderr
    return r.stderr


def _kill_rank0_after_a_logged_step(args: list[str], tmp_path: Path) -> None:
    """Rank 0 alone SIGKILLed right after it logged step 12 (its points made, none published
    past step 8's commit): rank 1 checkpoints step 12 with its shadow of those points."""
    log = tmp_path / "rank0-kill.log"
    proc = start_train(args, nproc=2, log_path=log, env=die_after_env(0, 12))
    try:
        proc.wait(timeout=240)
    finally:
        kill_leftovers(str(tmp_path))
    text = log.read_text()
    assert "[rank 1] WARNING a peer failed after step 12: step 12 checkpointed" in text, \
        text[-3000:]
    assert max(committed_steps(args[args.index("--checkpoint-dir") + 1])) == 12


def _series(points: dict[str, list[tuple[int, float]]]) -> dict[str, list[tuple[int, float]]]:
    return {k: v for k, v in points.items() if not k.endswith(TIMING)}


# ---------------------------------------------------------------------------- MLflow
def _mlflow_runs(db: Path, experiment: str) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{db}")
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id]) if exp else []


def _mlflow_points(db: Path, run) -> dict[str, list[tuple[int, float]]]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{db}")
    return {k: sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, k))
            for k in run.data.metrics}


def test_mlflow_one_run_every_point_exactly_once_across_two_sigkills(tmp_path):
    pytest.importorskip("mlflow")
    pytest.importorskip("sqlalchemy")
    db = tmp_path / "mlflow.db"
    common = [*ARGS, "--tracker", "mlflow", "--tracker-uri", f"sqlite:///{db}"]
    r = run_train([*common, "--tracker-project", "ref", "--checkpoint-dir",
                   str(tmp_path / "ref")], nproc=2)
    assert r.returncode == 0, r.stderr[-3000:]
    killed = [*common, "--tracker-project", "killed", "--tracker-run-name", "cut",
              "--checkpoint-dir", str(tmp_path / "run")]
    _kill_rank0_after_a_logged_step(killed, tmp_path)
    _train_killed_twice(killed, tmp_path, {})
    (ref,), runs = _mlflow_runs(db, "ref"), _mlflow_runs(db, "killed")
    assert len(runs) == 1, [r.info.run_id for r in runs]  # one run, whatever the restarts
    run = runs[0]
    want, got = _series(_mlflow_points(db, ref)), _series(_mlflow_points(db, run))
    assert {"train/loss", "train/lr", "eval/loss", "epoch/eval_acc"} <= set(want)
    assert len(want["train/loss"]) == 96 // 4 and len(want["eval/loss"]) == 3  # 16, 48, 80
    assert got == want
    assert run.info.status == "FINISHED" and run.info.run_name == "cut"
    assert run.data.tags["ftrain.resumes"] == "3" and run.data.tags["ftrain.published_step"] == "96"
    assert run.data.params["epochs"] == "3" and run.data.params["task.model"] == "mlp"
    blob = json.dumps([run.data.params, run.data.tags, ref.data.params, ref.data.tags])
    assert SECRET not in blob and "secret_token" not in blob

    # A resume that changes an allowed setting records the change; the parameter stays.
    more = [*common, "--tracker-project", "killed", "--epochs", "4", "--checkpoint-dir",
            str(tmp_path / "run")]
    r = run_train(more, nproc=2)
    assert r.returncode == 0, r.stderr[-3000:]
    (run,) = _mlflow_runs(db, "killed")
    assert run.data.params["epochs"] == "3"
    assert run.data.tags["ftrain.changed.epochs"] == "3 -> 4 (resume 4, step 96)"
    assert len(_mlflow_points(db, run)["train/loss"]) == 128 // 4


# ---------------------------------------------------------------------------- W&B
def _wandb_records(path: Path):
    """The records of a W&B run file: a 7-byte header (":W&B", 0xBEE1, version), then
    LevelDB-log blocks of 32 KiB, each record with a 7-byte header (CRC, length, type:
    1 full, 2 first, 3 middle, 4 last), none crossing a block (the rest of one is padding)."""
    data = path.read_bytes()
    assert data[:4] == b":W&B", path
    pos, block, parts = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        length = int.from_bytes(data[pos + 4:pos + 6], "little")
        kind = data[pos + 6]
        payload = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 0:  # padding, or a file that ends here
            continue
        parts = payload if kind in (1, 2) else parts + payload
        if kind in (1, 4):
            yield parts


def _wandb_points(folder: Path, run_id: str) -> dict[str, list[tuple[int, float]]]:
    """The history points of ``run_id`` as W&B keeps them when its offline files below
    ``folder`` are synced in the order they were written: a resumed run's point whose step is
    not above the last step W&B saw is dropped ("step must only increase")."""
    from wandb.proto import wandb_internal_pb2

    points: dict[str, list[tuple[int, float]]] = {}
    files = sorted(folder.glob(f"wandb/offline-run-*-{run_id}/run-{run_id}.wandb"))
    assert files, list(folder.rglob("*.wandb"))
    last = -1
    for path in files:
        for raw in _wandb_records(path):
            pb = wandb_internal_pb2.Record()
            pb.ParseFromString(raw)
            if pb.WhichOneof("record_type") != "history":
                continue
            step = pb.history.step.num
            if step <= last:
                continue
            last = step
            for item in pb.history.item:
                key = item.key or "/".join(item.nested_key)
                if not key.startswith("_"):
                    points.setdefault(key, []).append((step, json.loads(item.value_json)))
    return points


@pytest.mark.extended  # a second case: docs/development/testing.md
def test_wandb_offline_one_run_every_point_exactly_once_across_two_sigkills(tmp_path):
    pytest.importorskip("wandb")
    results = {}
    for name in ("ref", "run"):
        (tmp_path / name).mkdir()
    env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DISABLE_GIT": "true"}
    ref_env = {**env, "WANDB_DIR": str(tmp_path / "ref")}
    run_env = {**env, "WANDB_DIR": str(tmp_path / "run")}
    common = [*ARGS, "--tracker", "wandb"]
    r = run_train([*common, "--checkpoint-dir", str(tmp_path / "ref" / "ckpt")], nproc=2,
                  env=ref_env)
    assert r.returncode == 0, r.stderr[-3000:]
    _train_killed_twice([*common, "--checkpoint-dir", str(tmp_path / "run" / "ckpt")],
                        tmp_path, run_env)
    for name in ("ref", "run"):
        record = json.loads((tmp_path / name / "ckpt" / "tracker.json").read_text())
        assert record["published_step"] == 96
        results[name] = _wandb_points(tmp_path / name, record["run_id"])
        # One run: every attempt's files carry the same id.
        ids = {p.name.rsplit("-", 1)[1] for p in (tmp_path / name / "wandb").glob("offline-run-*")}
        assert ids == {record["run_id"]}, ids
    assert len(list((tmp_path / "run" / "wandb").glob("offline-run-*"))) == 3  # 3 attempts
    want, got = _series(results["ref"]), _series(results["run"])
    assert len(want["train/loss"]) == 96 // 4 and len(want["eval/loss"]) == 3
    assert got == want
    config = "".join(p.read_text() for p in (tmp_path / "run" / "wandb").rglob("config.yaml"))
    assert SECRET not in config
