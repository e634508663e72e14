"""``--parallel fsdp`` in-process: the sharded storage layer (DCP over our Storage) round-trips
a state without pickle, refuses a hostile pickle, groups its ranged reads, and its metadata
survives JSON; a sharded manifest is read only as format 3; the meta-device initialisation sets
a user module's own parameters and buffers through its reset_parameters() and refuses, by name,
a module it cannot initialise. (On several ranks, and end to end under torchrun:
tests/integration/test_fsdp.py.)
"""

from __future__ import annotations

import io
import json
import pickle
from pathlib import Path

import pytest
import torch
from torch import nn

from ftrain.checkpoint import CheckpointStore, step_dirname
from ftrain.storage import Storage
from tests.harness.checkpoints import assert_bitwise_equal


def _roundtrip(tmp_path: Path, state: dict, template: dict) -> dict:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import DefaultSavePlanner

    from ftrain.checkpoint.dcp import ShardWriter, decode_metadata
    from ftrain.checkpoint.dcp_read import SafeLoadPlanner, ShardReader

    storage = Storage(str(tmp_path))
    got: dict = {}

    def commit(metadata: bytes, table: dict) -> None:
        got.update(metadata=metadata, table=table)

    dcp.save(state, storage_writer=ShardWriter(storage, "step", "w1", commit=commit),
             planner=DefaultSavePlanner(), no_dist=True)
    assert list(got["table"]) == ["shard-00000-w1.distcp"]
    meta = decode_metadata(got["metadata"])
    dcp.load(template, storage_reader=ShardReader(storage, "step", meta),
             planner=SafeLoadPlanner(), no_dist=True)
    return got


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_shards_roundtrip_without_pickle(tmp_path):
    model = nn.Sequential(nn.Linear(5, 3), nn.BatchNorm1d(3))
    opt = torch.optim.AdamW(model.parameters(), lr=0.01, betas=(0.8, 0.9))
    model(torch.randn(4, 5)).sum().backward()
    opt.step()
    state = {"model": model.state_dict(), "optimizer": opt.state_dict(),
             "bf16": torch.arange(7, dtype=torch.bfloat16), "empty": torch.empty(0, 3)}
    template = {"model": {k: torch.zeros_like(v) for k, v in model.state_dict().items()},
                "optimizer": {"state": {i: {k: torch.zeros_like(v) for k, v in s.items()}
                                        for i, s in opt.state_dict()["state"].items()},
                              "param_groups": [dict(g, lr=0.0, betas=(0.0, 0.0)) for g in
                                               opt.state_dict()["param_groups"]]},
                "bf16": torch.zeros(7, dtype=torch.bfloat16), "empty": torch.empty(0, 3)}
    got = _roundtrip(tmp_path, state, template)
    for key in ("model", "bf16", "empty"):
        a, b = state[key], template[key]
        assert_bitwise_equal(a if isinstance(a, dict) else {key: a},
                             b if isinstance(b, dict) else {key: b})
    for i, s in state["optimizer"]["state"].items():
        assert_bitwise_equal(s, template["optimizer"]["state"][i])
    # Non-tensor values come back (through weights_only unpickling).
    assert template["optimizer"]["param_groups"] == state["optimizer"]["param_groups"]
    # The metadata is JSON, the shard file holds raw tensor bytes.
    doc = json.loads(got["metadata"])
    assert doc["state_dict_metadata"]["model.0.weight"]["size"] == [3, 5]
    raw = (tmp_path / "step" / "shard-00000-w1.distcp").read_bytes()
    weight = model.state_dict()["0.weight"].numpy().tobytes()
    assert weight in raw


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_a_hostile_pickle_in_a_shard_is_refused():
    from ftrain.checkpoint.dcp_read import SafeLoadPlanner

    class Evil:
        def __reduce__(self):
            return (print, ("code ran",))

    planner = SafeLoadPlanner()
    with pytest.raises(pickle.UnpicklingError):
        planner.load_bytes(None, io.BytesIO(pickle.dumps(Evil())))


def test_ranged_reads_group_nearby_items():
    from ftrain.checkpoint.dcp import Location, ShardFileError
    from ftrain.checkpoint.dcp_read import SPAN_GAP, _cut, _spans

    def at(offset: int, length: int) -> tuple[str, Location]:
        return f"{offset}", Location("f", offset, length, ())

    items = [at(SPAN_GAP * 5, 10), at(0, 100), at(100 + SPAN_GAP - 1, 8), at(SPAN_GAP * 3, 4)]
    groups = _spans(items)
    assert [[item for item, _ in g] for g in groups] == [
        ["0", f"{100 + SPAN_GAP - 1}"], [f"{SPAN_GAP * 3}"], [f"{SPAN_GAP * 5}"]]
    raw = bytes(range(256)) * 4
    (_, _, chunk), = _cut("f", 16, raw, [at(20, 4)])
    assert bytes(chunk) == raw[4:8]
    with pytest.raises(ShardFileError, match="f is shorter than its metadata says"):
        list(_cut("f", 16, raw, [at(16 + len(raw) - 2, 4)]))


def test_metadata_survives_json():
    from torch.distributed.checkpoint.metadata import (
        BytesStorageMetadata,
        ChunkStorageMetadata,
        Metadata,
        MetadataIndex,
        TensorProperties,
        TensorStorageMetadata,
    )

    from ftrain.checkpoint.dcp import Location, decode_metadata, encode_metadata

    md = Metadata(
        state_dict_metadata={
            "model.w": TensorStorageMetadata(TensorProperties(dtype=torch.bfloat16),
                                             torch.Size([4, 2]),
                                             [ChunkStorageMetadata(torch.Size([0, 0]),
                                                                   torch.Size([2, 2])),
                                              ChunkStorageMetadata(torch.Size([2, 0]),
                                                                   torch.Size([2, 2]))]),
            "optimizer.param_groups.0.lr": BytesStorageMetadata()},
        planner_data={"model.w": ("model", "w"),
                      "optimizer.param_groups.0.lr": ("optimizer", "param_groups", 0, "lr")},
        storage_data={MetadataIndex("model.w", [2, 0]): Location("shard-1.distcp", 64, 8, (2, 2)),
                      MetadataIndex("optimizer.param_groups.0.lr"): Location("s0", 0, 9)})
    back = decode_metadata(encode_metadata(md))
    assert back.state_dict_metadata == md.state_dict_metadata
    assert back.planner_data == md.planner_data
    assert back.storage_data == md.storage_data
    with pytest.raises(ValueError):
        decode_metadata(b'{"format": "pickle"}')


class _NoReset(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(3))
        self.inner = nn.Linear(3, 3)


def test_a_module_that_cannot_initialise_itself_is_named():
    from ftrain.runtime.exitcodes import InputError
    from ftrain.runtime.fsdp import check_initialisable

    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(2, 3), _NoReset())
    with pytest.raises(InputError, match=r"1 \(_NoReset: scale\)\. Add to each a "
                       r"reset_parameters\(self\)"):
        check_initialisable(model)
    check_initialisable(nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3)))


class _ForgetsItsMask(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(3))
        self.register_buffer("mask", torch.triu(torch.ones(3, 3)), persistent=False)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.scale)


def test_a_reset_parameters_that_forgets_a_buffer_is_refused():
    """Uninitialised memory would differ between ranks and runs: refused by name instead."""
    from ftrain.runtime.distributed import DistInfo
    from ftrain.runtime.exitcodes import InputError
    from ftrain.runtime.fsdp import build_model
    from ftrain.tasks import Task

    class Forgetful(Task):
        def build_model(self) -> nn.Module:
            return nn.Sequential(nn.Linear(3, 3), _ForgetsItsMask())

    with pytest.raises(InputError, match=r"1 \(_ForgetsItsMask: mask\): its reset_parameters"
                                         r"\(\) leaves these uninitialised"):
        build_model(Forgetful(), 3, DistInfo(0, 1, 0, torch.device("cpu"), None))


def test_the_language_model_initialises_from_the_meta_device():
    """examples/charlm.py's own tensors (a parameter drawn in __init__, a causal mask buffer)
    come out right through its reset_parameters()."""
    from examples.charlm import CharLM
    from ftrain.runtime.distributed import DistInfo
    from ftrain.runtime.fsdp import build_model

    model = build_model(CharLM(context=16, d_model=8, layers=1, heads=2), 3,
                        DistInfo(0, 1, 0, torch.device("cpu"), None))
    assert torch.equal(model.mask, nn.Transformer.generate_square_subsequent_mask(16))
    assert 0.01 < float(model.pos.detach().std()) < 0.03
    assert all(bool(t.isfinite().all()) for t in model.state_dict().values())


def test_default_shard_units_expand_containers():
    from ftrain.tasks import default_shard_units
    from ftrain.tasks.builtin.models import SmallCNN

    model = SmallCNN()
    units = default_shard_units(model)
    assert [type(u).__name__ for u in units] == ["Conv2d", "BatchNorm2d", "Conv2d",
                                                 "BatchNorm2d", "Linear", "Linear"]


def test_checkpoint_store_reads_sharded_manifests_only_as_format_3(tmp_path):
    store = CheckpointStore(Storage(str(tmp_path)))
    manifest = {"format_version": 3, "layout": "sharded", "step": 1, "epoch": 0,
                "state_file": "s", "train_state_file": "t", "files": {}}
    (tmp_path / step_dirname(1)).mkdir()
    (tmp_path / step_dirname(1) / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(Exception, match="lacks 'dcp_metadata_file'"):
        store.read_manifest(step_dirname(1))
