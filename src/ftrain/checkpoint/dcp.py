"""Sharded checkpoints: ``torch.distributed.checkpoint`` (DCP) over our ``Storage``.

DCP plans a save (which rank writes which tensor chunk; a replicated tensor is written once,
by the lowest rank that holds it) and a load (which chunks of the checkpoint each rank needs,
whatever world size wrote it: resharding). The bytes go through ``ShardWriter`` and
``ShardReader``, which move them with ``Storage`` alone (local folders and S3, one code path):

- Each rank writes ONE file, ``shard-<rank>-<writer>.distcp``, atomically and create-only, with
  its size and XXH3-128 checksum taken as it is written. A tensor chunk is stored as its raw
  bytes (64-byte aligned); a non-tensor value (optimizer hyperparameters) as ``torch.save``
  bytes, loaded back with ``weights_only=True``: nothing on the load path runs code.
- The coordinator (rank 0) receives every rank's write results (DCP gathers them), so it knows
  every shard file with its size and checksum. It encodes DCP's metadata as JSON
  (``dcp-<writer>.json``: no pickle) and hands both to the commit callback, which publishes the
  manifest create-only after everything else: the commit protocol of one writer, for many.
- An exception on any rank (a failed write, a failed commit) reaches every rank: DCP's save
  raises ``CheckpointException`` everywhere.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, BinaryIO

import torch
from torch.distributed.checkpoint import (
    Metadata,
    StorageWriter,
)
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import (
    SavePlan,
    SavePlanner,
    WriteItemType,
)
from torch.distributed.checkpoint.storage import WriteResult
from torch.futures import Future

from ..storage import CHECKSUM, Storage

log = logging.getLogger(__name__)

# One process without a process group (world size 1, the tools) is a case we mean: DCP's
# warning about it on every save and load would only bury the log.
warnings.filterwarnings("ignore", message=r"torch\.distributed is disabled, unavailable or "
                        r"uninitialized", category=UserWarning)

METADATA_FORMAT = "ftrain-dcp-json/1"
ALIGN = 64  # tensor chunks start at multiples of this in a shard file


class ShardFileError(Exception):
    """A shard file does not hold what the checkpoint's metadata says."""


@dataclass(frozen=True)
class Location:
    """Where one item's bytes are: file (relative to the checkpoint folder), offset, length;
    ``shape`` is the stored chunk's (tensors), empty for a bytes item."""

    file: str
    offset: int
    length: int
    shape: tuple[int, ...] = ()


@dataclass(frozen=True)
class _Written:
    """A rank's write result: the item's location plus its file's size and checksum (the
    coordinator builds the manifest's file table from them)."""

    location: Location
    file_size: int
    file_digest: str


@dataclass(frozen=True)
class _PlanData:
    """What the coordinator tells each rank in the global plan: its file name, or to skip."""

    file: str
    skip: bool


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


class ShardWriter(StorageWriter):
    """DCP's writer over ``Storage``: one file per rank in ``folder`` (a step folder below the
    storage root).

    ``writer``: the token in the file names (the coordinator's; two writers of one step never
    touch each other's files). ``precheck`` (coordinator): called while planning; False means
    the step is already committed and nothing is written. ``commit`` (coordinator): called
    with the encoded metadata and the shard files' table once every rank finished writing;
    its exception fails the save on every rank.
    """

    def __init__(self, storage: Storage, folder: str, writer: str,
                 precheck: Callable[[], bool] | None = None,
                 commit: Callable[[bytes, dict[str, dict[str, Any]]], None] | None = None) -> None:
        super().__init__()
        self.storage = storage
        self.folder = folder
        self.writer = writer
        self.precheck = precheck
        self.commit = commit
        self.is_coordinator = False
        self.skipped = False  # the coordinator found the step committed already

    def reset(self, checkpoint_id: Any = None) -> None:
        self.skipped = False

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        self.is_coordinator = is_coordinator

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        return plan

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        skip = self.precheck is not None and not self.precheck()
        self.skipped = skip
        return [dataclasses.replace(p, storage_data=_PlanData(
            f"shard-{i:05d}-{self.writer}.distcp", skip)) for i, p in enumerate(plans)]

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        data: _PlanData = plan.storage_data
        fut: Future[list[WriteResult]] = Future()
        if data.skip or not plan.items:
            fut.set_result([])
            return fut
        locations: list[tuple[Any, Location]] = []

        def produce(sink: BinaryIO) -> None:
            locations.clear()
            pos = 0
            for item in plan.items:
                obj = planner.resolve_data(item)
                if item.type == WriteItemType.BYTE_IO:
                    raw = memoryview(obj.getbuffer())
                    shape: tuple[int, ...] = ()
                else:
                    raw = _tensor_bytes(obj)
                    shape = tuple(obj.shape)
                pad = -pos % ALIGN
                if pad:
                    sink.write(b"\0" * pad)
                    pos += pad
                sink.write(raw)
                locations.append((item.index, Location(data.file, pos, len(raw), shape)))
                pos += len(raw)

        size, digest = self.storage.write_stream(f"{self.folder}/{data.file}", produce,
                                                 create_only=True)
        fut.set_result([WriteResult(index=index, size_in_bytes=loc.length,
                                    storage_data=_Written(loc, size, digest))
                        for index, loc in locations])
        return fut

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        if self.skipped:
            return
        table: dict[str, dict[str, Any]] = {}
        storage_data: dict[MetadataIndex, Location] = {}
        for rank_results in results:
            for r in rank_results:
                w: _Written = r.storage_data
                storage_data[r.index] = w.location
                table[w.location.file] = {"size": w.file_size, "algorithm": CHECKSUM,
                                          "digest": w.file_digest}
        metadata.storage_data = storage_data
        if self.commit is not None:
            self.commit(encode_metadata(metadata), table)

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: Any) -> bool:
        return False  # always passed explicitly


def encode_metadata(md: Metadata) -> bytes:
    """DCP's metadata as JSON (DCP itself pickles it; we never unpickle on load)."""
    tensors: dict[str, Any] = {}
    for fqn, m in md.state_dict_metadata.items():
        if isinstance(m, BytesStorageMetadata):
            tensors[fqn] = {"kind": "bytes"}
            continue
        p = m.properties
        if p.layout != torch.strided:
            raise ValueError(f"{fqn}: layout {p.layout} cannot be checkpointed")
        tensors[fqn] = {"kind": "tensor", "dtype": str(p.dtype).removeprefix("torch."),
                        "requires_grad": bool(p.requires_grad), "size": list(m.size),
                        "chunks": [[list(c.offsets), list(c.sizes)] for c in m.chunks]}
    storage = []
    for index, loc in md.storage_data.items():
        storage.append({"fqn": index.fqn,
                        "offset": None if index.offset is None else list(index.offset),
                        "index": index.index, "file": loc.file, "at": loc.offset,
                        "length": loc.length, "shape": list(loc.shape)})
    planner = {k: list(v) for k, v in (md.planner_data or {}).items()}
    return json.dumps({"format": METADATA_FORMAT, "version": getattr(md, "version", None),
                       "state_dict_metadata": tensors, "storage_data": storage,
                       "planner_data": planner}, sort_keys=True).encode()


def decode_metadata(raw: bytes | memoryview) -> Metadata:
    """The inverse of ``encode_metadata``; ValueError when it is not such a file."""
    try:
        doc = json.loads(bytes(raw))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"not JSON ({e})") from None
    if not isinstance(doc, dict) or doc.get("format") != METADATA_FORMAT:
        raise ValueError(f"not {METADATA_FORMAT} metadata")
    try:
        sd: dict[str, Any] = {}
        for fqn, m in doc["state_dict_metadata"].items():
            if m["kind"] == "bytes":
                sd[fqn] = BytesStorageMetadata()
                continue
            dtype = getattr(torch, m["dtype"])
            if not isinstance(dtype, torch.dtype):
                raise ValueError(f"{fqn}: unknown dtype {m['dtype']!r}")
            sd[fqn] = TensorStorageMetadata(
                TensorProperties(dtype=dtype, requires_grad=bool(m["requires_grad"])),
                torch.Size(m["size"]),
                [ChunkStorageMetadata(torch.Size(o), torch.Size(s)) for o, s in m["chunks"]])
        storage = {}
        for s in doc["storage_data"]:
            index = MetadataIndex(s["fqn"], s["offset"], s["index"])
            storage[index] = Location(str(s["file"]), int(s["at"]), int(s["length"]),
                                      tuple(int(n) for n in s["shape"]))
        planner = {k: tuple(v) for k, v in doc["planner_data"].items()}
    except (KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"malformed metadata ({type(e).__name__}: {e})") from None
    md = Metadata(state_dict_metadata=sd, planner_data=planner, storage_data=storage)
    if doc.get("version") is not None:
        md.version = doc["version"]  # not a field in every torch version; kept as written
    return md


def first_failure(e: BaseException) -> BaseException:
    """The lowest rank's exception inside DCP's CheckpointException (itself otherwise)."""
    failures = getattr(e, "failures", None) or getattr(e, "_failures", None)
    if not failures:
        return e
    first = failures[min(failures)]
    return first[0] if isinstance(first, tuple) else first


class ShardedCheckpointError(RuntimeError):
    """A sharded save or load failed on some rank (the message names the ranks and why)."""


def describe_failure(what: str, e: BaseException) -> str:
    failures = getattr(e, "failures", None) or {}
    cause = first_failure(e)
    ranks = f" on rank(s) {sorted(failures)}" if failures else ""
    return f"{what} failed{ranks}: {type(cause).__name__}: {str(cause)[:600]}"
