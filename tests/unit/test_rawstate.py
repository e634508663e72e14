"""The raw state file (checkpoint format 4, checkpoint/rawstate.py): the staged tensors' bytes
written as they are (O_DIRECT where the filesystem takes it), hashed in the same pass, loaded
back bitwise with every non-tensor value; a state the layout cannot carry goes through
torch.save (format 2); old checkpoints keep loading (the format 1 fixture:
tests/integration/test_legacy.py)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from ftrain.checkpoint import Checkpointer, CheckpointStore, step_dirname
from ftrain.checkpoint.rawstate import ALIGN, MAGIC, Arena, encode, is_raw, load_state
from ftrain.storage import Storage, checksum
from ftrain.storage.local import local_atomic_write_parts
from tests.harness.checkpoints import assert_bitwise_equal


def mixed_state() -> dict:
    """Every kind of value a state holds: dtypes of 1 to 16 bytes, 0-d, empty and
    non-contiguous tensors, and plain values in nested dicts, lists and tuples."""
    g = torch.Generator().manual_seed(3)
    return {
        "model": {"w": torch.randn(33, 7, generator=g), "b": torch.randn(7, generator=g).half(),
                  "t": torch.randn(5, 4, generator=g).t(),  # non-contiguous
                  "bf": torch.randn(3, generator=g).bfloat16(),
                  "mask": torch.rand(9, generator=g) > 0.5,
                  "count": torch.tensor(12, dtype=torch.int64),
                  "z": torch.randn(2, 2, generator=g, dtype=torch.complex64),
                  "empty": torch.empty(0, 3)},
        "optimizer": {"state": {0: {"step": torch.tensor(4.0), "momentum_buffer": torch.ones(3)}},
                      "param_groups": [{"lr": 0.1, "params": [0, 1], "nesterov": False,
                                        "betas": (0.9, 0.999), "name": None}]},
        "rng": [torch.get_rng_state(), (1, 2.5, "x")],
        "epoch": 3,
    }


def test_a_state_staged_in_an_arena_round_trips_bitwise(tmp_path):
    state = mixed_state()
    arena = Arena()
    snap = arena.copy(state)
    raw = encode(snap, arena)
    assert raw is not None and arena.buffer.data_ptr() % ALIGN == 0
    assert all(p.data_ptr() % ALIGN == 0 and p.numel() % ALIGN == 0 for p in raw.parts)
    path = tmp_path / "state.bin"
    written: dict = {}
    local_atomic_write_parts(str(path), raw.views(), raw.size, True, written)
    data = path.read_bytes()
    assert len(data) == raw.size == written["size"] and data[:8] == MAGIC and is_raw(data)
    assert written["digest"] == checksum(data)  # hashed in the same pass as written
    for back in (load_state(data), load_state(data, str(path))):  # a copy; a mapping
        assert_bitwise_equal(back["model"], state["model"])
        assert_bitwise_equal(back["optimizer"]["state"][0], state["optimizer"]["state"][0])
        assert back["optimizer"]["param_groups"] == state["optimizer"]["param_groups"]
        assert torch.equal(back["rng"][0], state["rng"][0]) and back["rng"][1] == (1, 2.5, "x")
        assert back["epoch"] == 3 and back["model"]["t"].shape == (4, 5)
    # The mapping is copy-on-write: an optimizer writing its loaded state changes no file.
    back["model"]["w"].add_(1.0)
    assert path.read_bytes() == data


def test_the_arena_is_reused_and_a_later_snapshot_leaves_an_earlier_write_alone():
    state = {"w": torch.zeros(1000)}
    arena = Arena()
    first = arena.copy(state)
    buffer = arena.buffer.data_ptr()
    state["w"].fill_(2.0)
    second = arena.copy(state)
    assert arena.buffer.data_ptr() == buffer and first["w"].data_ptr() == second["w"].data_ptr()
    assert torch.equal(second["w"], state["w"]) and second["w"] is not state["w"]
    arena.copy({"w": torch.zeros(2000)})  # another shape: a new buffer
    assert arena.used >= 8000


@pytest.mark.filterwarnings("ignore:Validating sparse tensor invariants")
def test_a_state_the_raw_layout_cannot_carry_goes_through_torch_save(tmp_path):
    """A sparse tensor has no single run of bytes: the checkpoint is written with torch.save
    (format 2, state-*.pt) and loads as before."""
    state = {"model": {"w": torch.randn(4, 4), "s": torch.eye(3).to_sparse()}}
    arena = Arena()
    assert encode(arena.copy(state), arena) is None
    store = CheckpointStore(Storage(str(tmp_path)))
    ck = Checkpointer(store, keep_last=2, orphan_grace_s=3600)
    try:
        ck.save(1, state, {"epoch": 0, "step": 1}, {"epoch": 0}, blocking=True)
    finally:
        ck.close()
    manifest = json.loads((tmp_path / step_dirname(1) / "manifest.json").read_text())
    assert manifest["format_version"] == 2 and manifest["state_file"].endswith(".pt")
    back = store.load(step_dirname(1)).state["model"]
    assert torch.equal(back["w"], state["model"]["w"])
    assert torch.equal(back["s"].to_dense(), torch.eye(3))


def test_the_checkpointer_writes_format_4_and_a_flipped_byte_is_caught(tmp_path):
    state = mixed_state()
    store = CheckpointStore(Storage(str(tmp_path)))
    ck = Checkpointer(store, keep_last=3, orphan_grace_s=3600)
    try:
        for step in (1, 2):
            ck.save(step, state, {"epoch": 0, "step": step}, {"epoch": 0}, blocking=True)
    finally:
        ck.close()
    folder = tmp_path / step_dirname(2)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["format_version"] == 4 and manifest["state_file"].endswith(".bin")
    assert_bitwise_equal(store.load(step_dirname(2)).state["model"], state["model"])
    path = folder / manifest["state_file"]
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01  # in the last tensor's bytes
    path.write_bytes(bytes(data))
    assert store.latest().name == step_dirname(1)  # step 2 skipped: its checksum fails


def test_writes_fall_back_to_the_page_cache_where_o_direct_is_refused(tmp_path):
    """A buffer that is not page-aligned makes an O_DIRECT write fail with EINVAL (as tmpfs
    refuses O_DIRECT at open): the same bytes go through the page cache, and only the
    file's bytes are written (not the padding)."""
    body = os.urandom(3 * ALIGN + 100)
    backing = bytearray(len(body) + ALIGN + 1)
    view = memoryview(backing)[1:1 + 4 * ALIGN]  # misaligned by one byte
    view[:len(body)] = body
    written: dict = {}
    path = tmp_path / "f.bin"
    local_atomic_write_parts(str(path), [view], len(body), False, written)
    assert path.read_bytes() == body and written == {"size": len(body), "digest": checksum(body)}
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):  # tmpfs: O_DIRECT refused at open
        target = shm / f"ftrain-raw-{os.getpid()}.bin"
        try:
            local_atomic_write_parts(str(target), [view], len(body), True, {})
            assert target.read_bytes() == body
        finally:
            target.unlink(missing_ok=True)


def test_a_malformed_raw_file_is_refused_with_the_reason(tmp_path):
    arena = Arena()
    raw = encode(arena.copy({"w": torch.ones(1024)}), arena)
    data = b"".join(bytes(v) for v in raw.views())[:raw.size]
    with pytest.raises(ValueError, match="outside the file"):
        load_state(data[:-8])  # cut short, checksum aside
    with pytest.raises(ValueError, match="runs past"):
        load_state(data[:8] + (10**9).to_bytes(8, "little") + data[16:])
