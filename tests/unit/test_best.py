"""Model selection from the committed history (checkpoint/best.py) and retention with
--keep-best: ranking, ties, early stopping's count, the flags' refusals (the restart tests:
tests/integration/test_best.py)."""

from __future__ import annotations

import json
import os

import pytest

from ftrain.checkpoint import MANIFEST, CheckpointStore, Manifest, step_dirname
from ftrain.checkpoint.best import Selection, resolved_mode
from ftrain.config import ConfigError, load_config
from ftrain.storage import Storage


def _state(losses: dict[int, float], epoch_ends: tuple[int, ...] = ()) -> dict:
    """A train state whose evaluations at ``losses``' steps gave those eval_loss values (the
    epoch ends' in the history, the others in evals)."""
    history = [{"epoch": i + 1, "step": s, "eval_loss": losses[s], "train_loss": 9.0}
               for i, s in enumerate(epoch_ends)]
    evals = [{"epoch": 1, "step": s, "eval_loss": v} for s, v in losses.items()
             if s not in epoch_ends]
    return {"history": history, "evals": evals}


def test_ranked_best_first_earlier_step_wins_a_tie_and_only_committed_steps_count():
    sel = Selection("eval_loss", "min", keep=2)
    ts = _state({4: 2.0, 8: 1.0, 12: 1.5, 16: 1.0, 20: 0.5}, epoch_ends=(16,))
    assert sel.ranked(ts, [4, 8, 12, 16]) == [8, 16, 12, 4]
    assert sel.keep_steps(ts, [4, 8, 12, 16, 24]) == {8, 16}  # 24 was never evaluated
    assert sel.keep_steps(ts, [4, 12, 20]) == {20, 12}  # 8 and 16 no longer exist
    assert Selection("eval_loss", "min", keep=0).keep_steps(ts, [4, 8]) == set()
    high = Selection("eval_acc", "max", keep=1)
    assert high.keep_steps({"evals": [{"step": 4, "eval_acc": 0.5},
                                      {"step": 8, "eval_acc": 0.7}]}, [4, 8]) == {8}


def test_nan_scores_are_never_best():
    sel = Selection("eval_loss", "min", keep=1)
    assert sel.keep_steps(_state({4: float("nan"), 8: 3.0}), [4, 8]) == {8}


def test_early_stopping_counts_evaluations_since_the_best():
    sel = Selection("eval_loss", "min", patience=3)
    assert sel.should_stop(_state({4: 2.0, 8: 1.0, 12: 1.1, 16: 1.0})) is None  # equal: no gain
    got = sel.should_stop(_state({4: 2.0, 8: 1.0, 12: 1.1, 16: 1.0, 20: 1.2}))
    assert got == {"reason": "early_stop", "metric": "eval_loss", "mode": "min", "patience": 3,
                   "best_step": 8, "best": 1.0, "evaluations_since_best": 3}
    assert sel.should_stop(_state({4: 2.0, 8: 1.0, 12: 1.1, 16: 0.9, 20: 1.2})) is None
    assert Selection("eval_loss", "min").should_stop(_state({4: 1.0, 8: 2.0})) is None


def test_best_mode_auto_is_min_for_a_loss_and_must_be_said_otherwise():
    assert resolved_mode("eval_loss", "auto") == "min"
    assert resolved_mode("eval_acc", "max") == "max"
    with pytest.raises(ValueError, match="--best-mode: say min or max"):
        resolved_mode("eval_acc", "auto")


@pytest.mark.parametrize("argv,message", [
    (["--keep-best", "2"], "--keep-best: needs --best-metric"),
    (["--early-stop-patience", "3"], "--early-stop-patience: needs --best-metric"),
    (["--best-metric", "acc", "--best-mode", "max"], "--best-metric: 'acc' is not an evaluation"),
    (["--best-metric", "eval_acc"], "--best-mode: say min or max for --best-metric eval_acc"),
    (["--best-metric", "eval_loss", "--keep-best", "-1"], "--keep-best: must be >= 0"),
])
def test_selection_flags_are_checked_at_start(argv, message):
    with pytest.raises(ConfigError, match=message):
        load_config(argv, environ={})


def test_selection_flags_parse():
    cfg = load_config(["--keep-best", "2", "--best-metric", "eval_acc", "--best-mode", "max",
                       "--early-stop-patience", "5"], environ={})
    assert Selection.from_config(cfg) == Selection("eval_acc", "max", 2, 5)
    assert Selection.from_config(load_config([], environ={})) is None


def _commit(store: CheckpointStore, step: int) -> None:
    files = {f"state-w{step}.pt": os.urandom(64),
             f"train_state-w{step}.json": json.dumps({"step": step}).encode()}
    assert store.commit(step, files, Manifest(format_version=2, step=step, epoch=0,
                                              state_file=f"state-w{step}.pt",
                                              train_state_file=f"train_state-w{step}.json"), "w")


def _left(root) -> list[int]:
    return sorted(int(p.parent.name[5:]) for p in root.glob(f"step_*/{MANIFEST}"))


def test_retention_keeps_the_newest_and_at_most_k_best_of_this_runs_steps(tmp_path):
    store = CheckpointStore(Storage(str(tmp_path)))
    sel = Selection("eval_loss", "min", keep=2)
    losses = {}
    for step, loss in ((4, 3.0), (8, 1.0), (12, 2.0), (16, 0.5), (20, 2.5), (24, 2.6), (28, 2.7)):
        _commit(store, step)
        losses[step] = loss
        ts = _state(losses)
        store.retain(2, 3600, newest=step, best=lambda c, ts=ts: sel.keep_steps(ts, c))
    assert _left(tmp_path) == [8, 16, 24, 28]  # newest 2; best 2 (16: 0.5, 8: 1.0)
    # Another run's (or a skipped corrupt) checkpoint above the newest is neither counted nor
    # deleted; a resumed run that saves below it keeps its own best.
    _commit(store, 100)
    _commit(store, 32)
    losses[32] = 0.1
    ts = _state(losses)
    store.retain(2, 3600, newest=32, best=lambda c: sel.keep_steps(ts, c))
    assert _left(tmp_path) == [16, 28, 32, 100]  # best 2: 32 and 16; 8 went, 24 went
    assert not (tmp_path / step_dirname(8)).exists()
