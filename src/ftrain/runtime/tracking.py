"""Experiment trackers (--tracker mlflow | wandb): one run per job across restarts, and every
step's point exactly once, with the values of an uninterrupted run.

- **The run.** Rank 0 creates it once and records it in ``tracker.json`` at the checkpoint
  root (create-only, before training) and in every checkpoint's train state; every restart,
  on any world size, continues that run. An attempt killed before its first checkpoint leaves
  the file, so its successor continues the same run too.
- **Parameters** are the config and the task's arguments (never --storage-options); a resume
  that changes a setting records the change as a tag instead of rewriting the parameter
  (MLflow's are immutable).
- **Points are published only once a checkpoint covering their step has committed.** Points
  of steps a SIGKILL loses are never published: the restart trains those steps again and
  publishes their (bitwise equal) points then. Points made but not yet published when a
  checkpoint is snapshotted go into it (``tracker_outbox``), and the tracker records the
  newest step it has published (MLflow: a tag written after the points; W&B: ``tracker.json``
  once the run has finished cleanly, since W&B writes its files in blocks and a SIGKILL loses
  what it holds: until then its points stay in the outbox), so a restart publishes exactly the
  points that are missing.

So the tracker lags the training by at most one save interval; what it shows is final.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Callable
from typing import Any

from ..config import Config
from ..errors import InputError
from ..storage import Storage, redact

log = logging.getLogger(__name__)

RUN_FILE = "tracker.json"
PUBLISHED_TAG = "ftrain.published_step"
RESUMES_TAG = "ftrain.resumes"
Point = list  # [step, key, value]: JSON as it is


def run_params(cfg: Config, task_args: dict[str, Any]) -> dict[str, str]:
    """The run's parameters: the config (less the secrets) and the task's arguments."""
    params = {k: v for k, v in cfg.to_dict().items() if k not in ("storage_options",)}
    params.update({f"task.{k}": v for k, v in task_args.items()})
    return {k: redact(v if isinstance(v, str) else json.dumps(v, sort_keys=True))[:500]
            for k, v in sorted(params.items())}


class Tracking:
    """Rank 0's publisher: points wait in ``pending`` until a checkpoint covering them has
    committed (``publish_upto``)."""

    def __init__(self, backend: Any, record: dict[str, Any], outbox: list[Point],
                 published: int) -> None:
        self.backend = backend
        self.record = record  # {"kind", "run_id", ...}: in tracker.json and every checkpoint
        self.published = self.resumed_published = published
        self.pending: list[Point] = [p for p in outbox if p[0] > published]
        # Published, but not known to be on disk yet (W&B writes its run file in blocks, and
        # a SIGKILL loses what it holds): kept in the outbox until the run ends cleanly.
        self.unconfirmed: list[Point] = []

    def add(self, step: int, metrics: dict[str, float]) -> None:
        self.pending.extend([step, k, float(v)] for k, v in metrics.items())

    def outbox(self) -> list[Point]:
        return [list(p) for p in self.unconfirmed + self.pending]

    def publish_upto(self, step: int | None) -> None:
        if step is None or step <= self.published:
            return
        ready = sorted((p for p in self.pending if p[0] <= step), key=lambda p: p[0])
        try:
            self.backend.publish(ready, step)
        except Exception as e:  # noqa: BLE001 - the tracker is down: training goes on
            log.warning("%s: publishing up to step %d failed (retried at the next "
                        "checkpoint): %s", self.record.get("kind"), step, redact(str(e)))
            return
        self.pending = [p for p in self.pending if p[0] > step]
        self.published = step
        if not self.backend.durable:
            self.unconfirmed += ready

    def close(self, status: str) -> None:
        self.backend.close(status, self.published)

    def durable(self) -> int:
        """The newest step whose points the tracker holds for good: published, and on disk
        (W&B's offline files: only once the run ends cleanly, so the resumed step)."""
        return self.published if self.backend.durable else self.resumed_published


class Shadow:
    """Another rank's copy of rank 0's tracker points, for the checkpoint a survivor writes
    when rank 0 died (core/loop.py): the same points, made by every rank, kept until rank 0's
    tracker holds them for good (``publish_upto`` with the watermark every rank learns with
    the stop flags). A resume publishes those above what the tracker has."""

    def __init__(self) -> None:
        self.pending: list[Point] = []

    def add(self, step: int, metrics: dict[str, float]) -> None:
        self.pending.extend([step, k, float(v)] for k, v in metrics.items())

    def outbox(self) -> list[Point]:
        return [list(p) for p in self.pending]

    def publish_upto(self, step: int | None) -> None:
        if step:
            self.pending = [p for p in self.pending if p[0] > step]

    def close(self, status: str) -> None:
        pass


def open_tracking(cfg: Config, storage: Storage, task_args: dict[str, Any],
                  resumed: dict[str, Any] | None, resumes: int, step: int) -> Tracking | None:
    """Rank 0, before training: the tracker's run, continued or created. ``resumed``: the
    train state of the checkpoint the run resumed from."""
    if cfg.tracker == "none":
        return None
    make: Callable[..., Any] = {"mlflow": _Mlflow, "wandb": _Wandb}[cfg.tracker]
    record = (resumed or {}).get("tracker")
    if not (isinstance(record, dict) and record.get("kind") == cfg.tracker):
        record = _run_file(storage, cfg)
    params = run_params(cfg, task_args)
    try:
        backend = make(cfg, storage, record, params, resumes, step)
    except InputError:
        raise
    except Exception as e:  # noqa: BLE001 - the tracker's own errors, named
        raise InputError(f"--tracker {cfg.tracker}: cannot open the run: "
                         f"{type(e).__name__}: {redact(str(e))[:500]}") from None
    if record is None:
        record = backend.record
        _write_run_file(storage, record, cfg.resume == "never")
    outbox = (resumed or {}).get("tracker_outbox") or []
    log.info("%s run %s (%s)%s", cfg.tracker, record["run_id"],
             "continued" if resumes or resumed else "new",
             f", published up to step {backend.published}" if backend.published else "")
    return Tracking(backend, record, outbox, backend.published)


def _run_file(storage: Storage, cfg: Config) -> dict[str, Any] | None:
    if cfg.resume == "never":
        return None
    try:
        record = json.loads(storage.read(RUN_FILE))
    except FileNotFoundError:
        return None
    except ValueError:
        raise InputError(f"{storage.uri(RUN_FILE)} is not JSON; delete it to start a new "
                         "tracker run") from None
    return record if isinstance(record, dict) and record.get("kind") == cfg.tracker else None


def _write_run_file(storage: Storage, record: dict[str, Any], replace: bool) -> None:
    data = json.dumps(record, sort_keys=True).encode()
    try:
        storage.write(RUN_FILE, data, create_only=not replace)
    except FileExistsError:
        storage.write(RUN_FILE, data)  # another tracker's file: this run is the job's now


def _changes(before: dict[str, str], now: dict[str, str]) -> dict[str, str]:
    return {k: f"{before[k]} -> {v}" for k, v in now.items() if k in before and before[k] != v}


# ---------------------------------------------------------------------------- MLflow
class _Mlflow:
    durable = True  # log_batch returns once the store has the points

    def __init__(self, cfg: Config, storage: Storage, record: dict[str, Any] | None,
                 params: dict[str, str], resumes: int, step: int) -> None:
        try:
            from mlflow.entities import Param, RunTag
            from mlflow.tracking import MlflowClient
        except ImportError:
            raise InputError("--tracker mlflow needs MLflow: pip install 'ftrain[mlflow]' (or "
                             "pip install mlflow)") from None
        self.client = MlflowClient(tracking_uri=cfg.tracker_uri or None)
        if record is None:
            exp = self.client.get_experiment_by_name(cfg.tracker_project)
            exp_id = exp.experiment_id if exp is not None else \
                self.client.create_experiment(cfg.tracker_project)
            run = self.client.create_run(exp_id, run_name=cfg.tracker_run_name or None,
                                         tags={"ftrain.checkpoint_dir": redact(storage.uri(""))})
            self.run_id = run.info.run_id
            self.record = {"kind": "mlflow", "run_id": self.run_id, "experiment_id": exp_id}
            before: dict[str, str] = {}
            self.published = 0
        else:
            self.run_id = record["run_id"]
            self.record = record
            run = self.client.get_run(self.run_id)
            before = dict(run.data.params)
            self.published = int(run.data.tags.get(PUBLISHED_TAG, 0))
            if run.info.status != "RUNNING":
                self.client.update_run(self.run_id, status="RUNNING")
        new = [Param(k, v) for k, v in params.items() if k not in before]
        tags = [RunTag(f"ftrain.changed.{k}", f"{text} (resume {resumes}, step {step})")
                for k, text in _changes(before, params).items()]
        tags.append(RunTag(RESUMES_TAG, str(resumes)))
        for i in range(0, max(len(new), 1), 100):  # MLflow takes 100 params per call
            self.client.log_batch(self.run_id, params=new[i:i + 100],
                                  tags=tags if i == 0 else [])

    def publish(self, points: list[Point], step: int) -> None:
        from mlflow.entities import Metric, RunTag

        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, s) for s, k, v in points]
        for i in range(0, len(metrics), 900):
            self.client.log_batch(self.run_id, metrics=metrics[i:i + 900])
        # The newest published step, written after the points: a restart publishes what is
        # above it. (A crash between the two republishes one batch of equal points.)
        self.client.log_batch(self.run_id, tags=[RunTag(PUBLISHED_TAG, str(step))])

    def close(self, status: str, published: int) -> None:
        self.client.set_terminated(self.run_id, status=status)


# ---------------------------------------------------------------------------- W&B
class _Wandb:
    # run.log hands the points to W&B's service, which writes them in blocks: a SIGKILL loses
    # what it holds. Durable once the run has finished cleanly.
    durable = False

    def __init__(self, cfg: Config, storage: Storage, record: dict[str, Any] | None,
                 params: dict[str, str], resumes: int, step: int) -> None:
        try:
            import wandb
        except ImportError:
            raise InputError("--tracker wandb needs wandb: pip install 'ftrain[wandb]' (or "
                             "pip install wandb)") from None
        self.storage = storage
        run_id = record["run_id"] if record else uuid.uuid4().hex[:12]
        self.record = {"kind": "wandb", "run_id": run_id, "project": cfg.tracker_project,
                       **(record or {})}
        # The newest published step is in the run file (a checkpoint's copy is older).
        on_file = _run_file(storage, cfg) or {}
        self.published = int(on_file.get("published_step", 0)) \
            if on_file.get("run_id") == run_id else 0
        self.record.pop("published_step", None)
        self.run = wandb.init(project=self.record.get("project", cfg.tracker_project),
                              id=run_id, resume="allow", name=cfg.tracker_run_name or None,
                              config=params, allow_val_change=True)
        self.run.config.update({RESUMES_TAG: resumes}, allow_val_change=True)
        if resumes:
            self.run.tags = (*self.run.tags, f"resume {resumes} at step {step}")

    def publish(self, points: list[Point], step: int) -> None:
        by_step: dict[int, dict[str, float]] = {}
        for s, k, v in points:
            by_step.setdefault(s, {})[k] = v
        for s in sorted(by_step):
            self.run.log(by_step[s], step=s)

    def close(self, status: str, published: int) -> None:
        self.run.finish(exit_code={"FINISHED": 0, "KILLED": 143}.get(status, 1))
        # Finished: everything published is in W&B's files; a restart publishes what is above.
        self.storage.write(RUN_FILE, json.dumps({**self.record, "published_step": published},
                                                sort_keys=True).encode())
