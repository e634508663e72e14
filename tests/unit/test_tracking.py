"""The tracker's publisher (runtime/tracking.py) with a recording backend: points wait for the
checkpoint that covers them, an outbox carries the unpublished ones (and, for a backend whose
writes a SIGKILL can lose, the unconfirmed ones) into the checkpoint, and a restart publishes
exactly what is missing (real MLflow and W&B: tests/integration/test_trackers.py)."""

from __future__ import annotations

from ftrain.config import load_config
from ftrain.runtime.tracking import Tracking, run_params


class Recorder:
    def __init__(self, durable: bool) -> None:
        self.durable = durable
        self.points: list[list] = []
        self.closed: tuple | None = None

    def publish(self, points, step):
        self.points += points

    def close(self, status, published):
        self.closed = (status, published)


def _attempt(backend, outbox, published, steps, commits):
    t = Tracking(backend, {"kind": "x", "run_id": "r"}, outbox, published)
    snapshots = {}
    for step in steps:
        t.add(step, {"loss": float(step)})
        if step in commits:
            snapshots[step] = t.outbox()  # the checkpoint of this step carries it
        t.publish_upto(max((c for c in commits if c <= step - 2), default=None))
    return t, snapshots


def test_points_wait_for_their_checkpoint_and_a_restart_fills_the_gap_exactly():
    for durable in (True, False):
        rec = Recorder(durable)
        # Attempt 1: each checkpoint commits two steps after its snapshot; SIGKILLed at
        # step 11 (after 8's commit was published; the points of 9-11 are lost).
        t, snaps = _attempt(rec, [], 0, range(1, 12), {4, 8})
        assert [p[0] for p in rec.points] == list(range(1, 9))
        # Attempt 2 resumes from 8. The tracker has recorded 8 (MLflow's tag); W&B's marker is
        # written when a run finishes, so it still says 0 and 8's outbox holds 1-8.
        published = 8 if durable else 0
        assert [p[0] for p in snaps[8]] == list(range(5 - 4 * (not durable), 9))
        t2, _ = _attempt(rec, snaps[8], published, range(9, 17), {12, 16})
        t2.publish_upto(16)
        t2.close("FINISHED")
        steps = [p[0] for p in rec.points]
        if durable:
            assert steps == list(range(1, 17))  # every step once
        else:  # 1-8 again: W&B's run file lost the first ones with the SIGKILL
            assert steps == [*range(1, 9), *range(1, 17)]
        assert rec.closed == ("FINISHED", 16)


def test_a_failing_tracker_keeps_the_points_for_the_next_checkpoint():
    class Down(Recorder):
        def publish(self, points, step):
            raise ConnectionError("tracker down")

    t = Tracking(Down(True), {"kind": "x", "run_id": "r"}, [], 0)
    t.add(1, {"loss": 1.0})
    t.publish_upto(1)
    assert t.published == 0 and t.outbox() == [[1, "loss", 1.0]]


def test_no_secret_in_the_params():
    cfg = load_config(["--storage-options", '{"key": "AKIA-SECRET", "secret": "s3cr3t"}',
                       "--tracker", "mlflow"], environ={})
    params = run_params(cfg, {"width": 8})
    assert params["task.width"] == "8" and "storage_options" not in params
    assert "s3cr3t" not in str(params) and "AKIA-SECRET" not in str(params)
