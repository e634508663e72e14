"""The saver never makes the loop wait for storage: while one save persists, a newer snapshot
waits its turn in the second buffer set and a still newer one replaces it (dropped, counted,
logged once with the numbers); what is persisted is always the state at the time of its save."""

from __future__ import annotations

import logging
import sys

import torch

from ftrain.checkpoint import Checkpointer, CheckpointStore
from tests.harness.checkpoints import committed_steps
from tests.harness.stores import HeldStorage


def test_saves_due_during_a_persist_never_wait_and_the_newest_wins(tmp_path, caplog):
    """Storage held: the persist of step 1 cannot commit until the test releases it. Saves 2,
    3 and 4 come due meanwhile and return (a save that waited for the persist would never
    return); 2 and 3 are dropped for the newer 4, which persists once storage is free."""
    storage = HeldStorage(str(tmp_path), held=True)
    store = CheckpointStore(storage)
    saver = Checkpointer(store, keep_last=10, orphan_grace_s=3600)
    model = torch.nn.Linear(64, 64)

    def save(step: int, **kw):
        with torch.no_grad():
            model.weight.fill_(step)
        return saver.save(step, {"model": model.state_dict()}, {"epoch": 0, "step": step},
                          {"epoch": 0}, **kw)

    with caplog.at_level(logging.WARNING, logger="ftrain.checkpoint"):
        save(1)
        assert storage.committing.wait(60)  # step 1's files are written, its commit held
        for step in (2, 3, 4):
            assert save(step) is None  # returned at once: a background save
        assert committed_steps(tmp_path) == []  # so none of them waited for step 1
        storage.release()
        assert saver.wait() is True
    assert committed_steps(tmp_path) == [1, 4]
    assert saver.dropped == 2
    assert caplog.text.count("come due faster than storage takes them") == 1
    assert "the last persist took" in caplog.text and "saves come every" in caplog.text
    for step in (1, 4):  # each holds the weights of its own moment, not a later snapshot's
        loaded = store.load(f"step_{step:010d}")
        assert torch.all(loaded.state["model"]["weight"] == step)
    # A blocking save waits for its own commit, also behind a persist in flight.
    storage.committing.clear()
    save(5)
    assert storage.committing.wait(60)  # step 5 persists: 6 does not replace it
    assert save(6, blocking=True) is True
    assert committed_steps(tmp_path)[-1] == 6 and saver.dropped == 2
    saver.close()


def test_manifest_versions_do_not_import_torchvision(monkeypatch):
    """The first save's manifest once imported torchvision for its version: 0.19 s in the
    persister thread, holding the GIL while the loop trained (the next epoch ran at 60%
    speed). Its version comes from the package metadata unless it is imported already."""
    import importlib.metadata

    from ftrain.checkpoint import format as fmt

    monkeypatch.setitem(sys.modules, "torchvision", None)  # an import of it would fail
    versions = fmt._library_versions.__wrapped__()
    assert versions["torchvision"] == importlib.metadata.version("torchvision")
    assert versions["torch"] == torch.__version__
