"""Regression tests for defects found in review: retention with corrupt newer checkpoints,
non-finite numbers, unknown storage protocols (unwritable checkpoint folders, in a real run:
tests/integration/test_review_fixes.py)."""

from __future__ import annotations

import os

import pytest

from ftrain.checkpoint import MANIFEST, CheckpointStore, Manifest, step_dirname
from ftrain.config import ConfigError, load_config
from ftrain.storage import Storage


def _commit(store: CheckpointStore, step: int) -> None:
    files = {f"state-w{step}.pt": os.urandom(64), f"train_state-w{step}.json": b"{}"}
    assert store.commit(step, files, Manifest(format_version=1, step=step, epoch=0,
                                              state_file=f"state-w{step}.pt",
                                              train_state_file=f"train_state-w{step}.json"), "w")


def test_retention_never_deletes_the_new_checkpoint_for_corrupt_newer_ones(tmp_path):
    store = CheckpointStore(Storage(str(tmp_path)))
    for step in (800, 900, 1000, 1100):
        _commit(store, step)
    for step in (1000, 1100):  # corrupt: data bytes changed, manifests intact
        data = tmp_path / step_dirname(step) / f"state-w{step}.pt"
        data.write_bytes(b"x" * 64)
    _commit(store, 950)  # a resumed run (from 900) saves below the corrupt ones
    store.retain(2, grace_s=3600, newest=950)
    left = sorted(p.parent.name for p in tmp_path.glob(f"step_*/{MANIFEST}"))
    assert step_dirname(950) in left and step_dirname(900) in left
    assert step_dirname(800) not in left  # beyond keep_last among this run's steps


@pytest.mark.parametrize("flag", ["--lr", "--dist-timeout", "--preemption-deadline"])
@pytest.mark.parametrize("value", ["nan", "inf"])
def test_non_finite_numbers_are_refused(flag, value):
    with pytest.raises(ConfigError, match=flag):
        load_config([flag, value], environ={})


def test_unknown_protocol_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown storage protocol 'foo'"):
        load_config(["--checkpoint-dir", "foo://x/y"], environ={})
