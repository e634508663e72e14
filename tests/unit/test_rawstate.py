"""The raw state file (checkpoint format 4, checkpoint/rawstate.py): the staged tensors' bytes
written as they are (O_DIRECT where the filesystem takes it), hashed in the same pass, loaded
back bitwise with every non-tensor value; a state the layout cannot carry goes through
torch.save (format 2); old checkpoints keep loading (the format 1 fixture:
tests/integration/test_legacy.py)."""

from __future__ import annotations

import json
import os

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


def test_an_arena_is_reused_while_the_shapes_stay_and_its_gaps_are_zeros():
    """The same buffer from snapshot to snapshot (a copy, never the live tensor); a new one
    for new shapes; the bytes between tensors, which are in the file, are zeros."""
    state = {"a": torch.full((3,), -1, dtype=torch.uint8), "w": torch.zeros(1000)}
    arena = Arena()
    first = arena.copy(state)
    buffer = arena.buffer.data_ptr()
    state["w"].fill_(2.0)
    second = arena.copy(state)
    assert arena.buffer.data_ptr() == buffer and first["w"].data_ptr() == second["w"].data_ptr()
    assert torch.equal(second["w"], state["w"]) and second["w"] is not state["w"]
    assert not arena.buffer[3:64].any() and not arena.buffer[arena.used:].any()
    raw = encode(second, arena)
    again = encode(arena.copy(state), arena)
    assert b"".join(map(bytes, raw.views())) == b"".join(map(bytes, again.views()))
    arena.copy({"w": torch.zeros(2000)})  # another shape: a new buffer
    assert arena.used >= 8000


def test_a_snapshot_taken_while_the_previous_one_is_written_does_not_touch_it(tmp_path,
                                                                             monkeypatch):
    """The persister writes one set's buffer while the loop snapshots the next save into the
    other: the committed checkpoint holds the first state, bit for bit."""
    import threading

    from ftrain.storage import fs

    entered, release = threading.Event(), threading.Event()
    real = fs.Storage.write_parts

    def held(self, rel, parts, size, create_only=False):
        if not entered.is_set():
            entered.set()
            assert release.wait(30)
        return real(self, rel, parts, size, create_only)

    monkeypatch.setattr(fs.Storage, "write_parts", held)
    store = CheckpointStore(Storage(str(tmp_path)))
    ck = Checkpointer(store, keep_last=3, orphan_grace_s=3600)
    w = torch.arange(4096, dtype=torch.float32)
    state, want = {"model": {"w": w}}, w.clone()
    try:
        ck.save(1, state, {"epoch": 0, "step": 1}, {"epoch": 0})
        assert entered.wait(30)  # step 1's state file is being written now
        w.mul_(-1)
        ck.save(2, state, {"epoch": 0, "step": 2}, {"epoch": 0})
        w.add_(7)  # the loop trains on
        release.set()
        assert ck.wait(30)
    finally:
        release.set()
        ck.close()
    assert torch.equal(store.load(step_dirname(1)).state["model"]["w"], want)
    assert torch.equal(store.load(step_dirname(2)).state["model"]["w"], -want)


@pytest.mark.filterwarnings("ignore:Validating sparse tensor invariants")
def test_a_state_the_raw_layout_cannot_carry_goes_through_torch_save(tmp_path):
    """A sparse tensor has no single run of bytes: the checkpoint is written with torch.save
    (format 2, state-*.pt) and loads as before."""
    state = {"model": {"w": torch.randn(4, 4), "s": torch.eye(3).to_sparse()}}
    back = _saved_with_torch_save(tmp_path, state)["model"]
    assert torch.equal(back["w"], state["model"]["w"])
    assert torch.equal(back["s"].to_dense(), torch.eye(3))


def _saved_with_torch_save(tmp_path, state):
    """``state`` checkpointed as format 2 (``encode`` refuses it), and read back."""
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
    return store.load(step_dirname(1)).state


def test_a_dict_of_the_users_with_the_raw_formats_own_key_goes_through_torch_save(tmp_path):
    """The raw header marks a tensor's place with a one-key dict: a task's own dict with that
    key would read back as a tensor. Such a state is written with torch.save (format 2) and
    reads back as it was."""
    key = "__ftrain_raw_tensor__"
    state = {"model": {"w": torch.randn(4, 4)}, "task": {"mine": {key: 0}, "n": [{key: 7}]}}
    back = _saved_with_torch_save(tmp_path, state)
    assert back["task"] == {"mine": {key: 0}, "n": [{key: 7}]}
    assert torch.equal(back["model"]["w"], state["model"]["w"])


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
    header = int.from_bytes(data[8:16], "little")
    data[-(-(16 + header) // ALIGN) * ALIGN + 5] ^= 0x01  # in the first tensor's bytes
    path.write_bytes(bytes(data))
    assert store.latest().name == step_dirname(1)  # step 2 skipped: its checksum fails


def test_writes_fall_back_to_the_page_cache_where_o_direct_is_refused(tmp_path, monkeypatch):
    """A buffer that is not page-aligned makes an O_DIRECT write fail with EINVAL: the same
    bytes go through the page cache, and only the file's bytes are written (not the
    padding). A filesystem without direct I/O (tmpfs before Linux 6.6) refuses to switch the
    file to O_DIRECT: written through the page cache as well, published create-only."""
    import errno
    import fcntl

    body = os.urandom(3 * ALIGN + 100)
    backing = bytearray(len(body) + ALIGN + 1)
    view = memoryview(backing)[1:1 + 4 * ALIGN]  # misaligned by one byte
    view[:len(body)] = body
    written: dict = {}
    path = tmp_path / "f.bin"
    local_atomic_write_parts(str(path), [view], len(body), False, written)
    assert path.read_bytes() == body and written == {"size": len(body), "digest": checksum(body)}

    real = fcntl.fcntl

    def refuse(fd, cmd, arg=0):
        if cmd == fcntl.F_SETFL and arg & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, cmd, arg)

    monkeypatch.setattr(fcntl, "fcntl", refuse)
    arena = Arena()
    raw = encode(arena.copy({"w": torch.arange(5000)}), arena)
    size, digest = Storage(str(tmp_path)).write_parts("g.bin", raw.views(), raw.size, True)
    data = (tmp_path / "g.bin").read_bytes()
    assert (size, digest) == (len(data), checksum(data)) == (raw.size, checksum(data))
    assert torch.equal(load_state(data)["w"], torch.arange(5000))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.bin", "g.bin"]  # no temp file


def _with_header(data: bytes, header: object) -> bytes:
    """``data``, a raw file, with its header replaced (its tensor bytes kept at their offset)."""
    import io

    old = int.from_bytes(data[8:16], "little")
    start = -(-(16 + old) // ALIGN) * ALIGN
    buf = io.BytesIO()
    torch.save(header, buf)
    body = buf.getvalue()
    assert 16 + len(body) <= start
    return (MAGIC + len(body).to_bytes(8, "little") + body).ljust(start, b"\0") + data[start:]


def test_a_malformed_raw_file_is_refused_with_the_reason(tmp_path):
    """Cut short, or a header that lies about the tensors (past the file's end, a size that
    does not match the shape, an index out of range, an odd offset): a ValueError naming it,
    never a read outside the file or a tensor of uninitialised memory."""
    arena = Arena()
    raw = encode(arena.copy({"w": torch.ones(1024)}), arena)
    data = b"".join(bytes(v) for v in raw.views())[:raw.size]
    assert torch.equal(load_state(data)["w"], torch.ones(1024))
    with pytest.raises(ValueError, match="outside the file"):
        load_state(data[:-8])  # cut short, checksum aside
    with pytest.raises(ValueError, match="runs past"):
        load_state(data[:8] + (10**9).to_bytes(8, "little") + data[16:])
    key = "__ftrain_raw_tensor__"
    for tensors, skeleton, reason in (
            ([("float32", [4, 4], 0, 0)], {"w": {key: 0}}, "said to take 0 bytes"),
            ([("float32", [10**12], 0, 4 * 10**12)], {"w": {key: 0}}, "outside the file"),
            ([("float32", [-1], 0, 4)], {"w": {key: 0}}, "shape is malformed"),
            ([("float32", [2], 2, 8)], {"w": {key: 0}}, "alignment"),
            ([("float32", [2], 0, 8)], {"w": {key: -1}}, "names tensor -1 of 1"),
            ([("os.system", [2], 0, 8)], {"w": {key: 0}}, "unknown dtype"),
            ([("float32", [2], 0)], {"w": {key: 0}}, "malformed")):
        header = {"skeleton": skeleton, "tensors": tensors, "byteorder": "little"}
        with pytest.raises(ValueError, match=reason):
            load_state(_with_header(data, header))
    with pytest.raises(ValueError, match="not a raw state file's"):
        load_state(_with_header(data, [1, 2]))


def test_the_save_benchmark_times_its_references_on_a_format_4_checkpoint(tmp_path, capsys):
    """`launch.bench --only save` compares a run's saves with a synchronous torch.save and a
    raw write of the same checkpoint's state (launch/bench_checkpoint.py --references): they
    read the raw state file and time the same bytes (no timing is asserted)."""
    from launch.bench_checkpoint import references

    store = CheckpointStore(Storage(str(tmp_path / "ck")))
    ck = Checkpointer(store, keep_last=2, orphan_grace_s=3600)
    try:
        ck.save(3, {"model": {"w": torch.randn(256, 256)}}, {"epoch": 0, "step": 3},
                {"epoch": 0}, blocking=True)
    finally:
        ck.close()
    (state_file,) = (tmp_path / "ck" / step_dirname(3)).glob("state-*.bin")
    got = references(str(tmp_path / "ck" / step_dirname(3)), str(tmp_path / "work"), 1)
    assert json.loads(capsys.readouterr().out) == got
    assert got["mib"] == state_file.stat().st_size / 2**20
    assert got["sync_save_s"] > 0 and got["raw_write_s"] > 0
    assert not (tmp_path / "work").exists()  # its scratch files are gone
