"""Checkpoint format 2 and later: every file's entry names its checksum algorithm (the format 1 checkpoint
kept as a fixture, verified and resumed for real: tests/integration/test_legacy.py)."""

from __future__ import annotations

import pytest


def test_new_checkpoints_record_the_checksum_algorithm_per_file(tmp_path):
    """Format 2 and later (4: the raw state file): every file's entry names its algorithm
    (XXH3-128); a flipped byte fails it,
    and an entry naming an algorithm this build does not know is reported as such."""
    import json

    from ftrain.checkpoint import FORMAT_VERSION, CheckpointStore, CorruptCheckpoint
    from ftrain.storage import Storage
    from tests.harness.s3 import save_checkpoint

    save_checkpoint(str(tmp_path), 3)
    manifest_path = tmp_path / "step_0000000003" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    assert manifest["format_version"] == FORMAT_VERSION == 4
    for meta in manifest["files"].values():
        assert meta["algorithm"] == "xxh3-128" and len(meta["digest"]) == 32
    store = CheckpointStore(Storage(str(tmp_path)))
    store.load("step_0000000003")
    fname = next(iter(manifest["files"]))
    manifest["files"][fname]["algorithm"] = "md4"
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(CorruptCheckpoint, match="unknown checksum algorithm 'md4'"):
        store.load("step_0000000003")
