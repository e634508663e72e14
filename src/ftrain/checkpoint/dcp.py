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
import io
import json
import logging
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO

import torch
from torch.distributed.checkpoint import (
    DefaultLoadPlanner,
    Metadata,
    StorageReader,
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
    LoadItemType,
    LoadPlan,
    LoadPlanner,
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


class ShardReader(StorageReader):
    """DCP's reader over ``Storage``: ``metadata`` was decoded from the checkpoint's verified
    metadata file; each shard file this rank needs is read once (locally: memory-mapped), or
    taken from ``verified`` (file name -> bytes this rank downloaded and checked already)."""

    def __init__(self, storage: Storage, folder: str, metadata: Metadata,
                 verified: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.storage = storage
        self.folder = folder
        self.metadata = metadata
        self.verified = verified if verified is not None else {}

    def reset(self, checkpoint_id: Any = None) -> None:
        pass

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        return self.metadata

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args: Any,
                              **kwargs: Any) -> None:
        self.metadata = metadata

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return plans

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        by_file: dict[str, list[Any]] = {}
        for item in plan.items:
            loc: Location = self.metadata.storage_data[item.storage_index]
            by_file.setdefault(loc.file, []).append((item, loc))
        for fname, items in sorted(by_file.items()):
            for item, loc, chunk in self._chunks(fname, items):
                if item.type == LoadItemType.BYTE_IO:
                    planner.load_bytes(item, io.BytesIO(bytes(chunk)))
                    continue
                meta = self.metadata.state_dict_metadata[item.storage_index.fqn]
                stored = _frombuffer(chunk, meta.properties.dtype, loc.shape)
                for dim, (off, n) in enumerate(zip(item.storage_offsets, item.lengths,
                                                   strict=True)):
                    stored = stored.narrow(dim, off, n)
                target = planner.resolve_tensor(item).detach()
                if target.shape != stored.shape:
                    raise ShardFileError(f"{fname}: {item.storage_index.fqn} has shape "
                                         f"{tuple(stored.shape)}, expected "
                                         f"{tuple(target.shape)}")
                target.copy_(stored)
                planner.commit_tensor(item, target)
        fut: Future[None] = Future()
        fut.set_result(None)
        return fut

    def _chunks(self, fname: str, items: list[tuple[Any, Location]]
                ) -> Iterator[tuple[Any, Location, memoryview]]:
        """(item, where it is, its bytes) for this rank's items in one shard file. The bytes
        come from the file as this rank verified it, or the whole file memory-mapped (local),
        or (remote) ranged reads of the spans the items cover: a rank that needs a few items
        of another rank's file (values written once, by the lowest rank) fetches only those."""
        rel = f"{self.folder}/{fname}"
        data = self.verified.pop(fname, None)
        if data is None and self.storage.is_local:
            data = self.storage.read_mapped(rel)
        if data is not None:
            yield from _cut(fname, 0, data, items)
            return
        for group in _spans(items):
            start = group[0][1].offset
            end = max(loc.offset + loc.length for _, loc in group)
            yield from _cut(fname, start, self.storage.read_range(rel, start, end), group)

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: Any) -> bool:
        return False


SPAN_GAP = 1 << 20  # ranged reads: items closer than this share one request


def _spans(items: list[tuple[Any, Location]]) -> list[list[tuple[Any, Location]]]:
    """The items of one file in offset order, grouped into runs with gaps under SPAN_GAP."""
    groups: list[list[tuple[Any, Location]]] = []
    end = 0
    for item, loc in sorted(items, key=lambda il: il[1].offset):
        if groups and loc.offset - end < SPAN_GAP:
            groups[-1].append((item, loc))
            end = max(end, loc.offset + loc.length)
        else:
            groups.append([(item, loc)])
            end = loc.offset + loc.length
    return groups


def _cut(fname: str, start: int, raw: Any, items: list[tuple[Any, Location]]
         ) -> Iterator[tuple[Any, Location, memoryview]]:
    """Each item's bytes out of ``raw``, the file's bytes from offset ``start`` on."""
    for item, loc in items:
        if loc.offset + loc.length > start + len(raw):
            raise ShardFileError(f"{fname} is shorter than its metadata says")
        yield item, loc, memoryview(raw)[loc.offset - start:loc.offset - start + loc.length]


def _frombuffer(chunk: memoryview, dtype: torch.dtype, shape: Iterable[int]) -> torch.Tensor:
    shape = tuple(shape)
    numel = 1
    for n in shape:
        numel *= n
    size = torch.empty((), dtype=dtype).element_size()
    if len(chunk) != numel * size:
        raise ShardFileError(f"a chunk of {len(chunk)} bytes cannot hold {shape} x {dtype}")
    if numel == 0:
        return torch.empty(shape, dtype=dtype)
    with warnings.catch_warnings():
        # A read-only mapping: torch warns that the tensor is not writable. It is only read
        # (copied into the target right away).
        warnings.simplefilter("ignore", UserWarning)
        raw = torch.frombuffer(chunk, dtype=torch.uint8)
    return raw.view(dtype).reshape(shape)


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's default load planner, except that non-tensor values are unpickled with
    ``weights_only=True`` (DefaultLoadPlanner uses a general unpickler: a checkpoint must never
    run code when loaded)."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        obj = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            # As DefaultLoadPlanner does: the flattened key's value goes into the original
            # (nested) state dict.
            _set_path(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


def _set_path(root: Any, path: tuple[Any, ...], value: Any) -> None:
    for key in path[:-1]:
        root = root[key]
    root[path[-1]] = value


# ---------------------------------------------------------------------------- metadata as JSON
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


def read_full_tensors(storage: Storage, folder: str, metadata: Metadata, prefix: str
                      ) -> dict[str, Any]:
    """Every value under ``prefix`` (e.g. ``"model."``) of a sharded checkpoint, assembled whole
    from its chunks, keyed without the prefix: one process, no model and no process group
    needed. Tensors are CPU tensors; other values are loaded with ``weights_only=True``."""
    out: dict[str, Any] = {}
    by_fqn: dict[str, list[tuple[MetadataIndex, Location]]] = {}
    for index, loc in metadata.storage_data.items():
        if index.fqn.startswith(prefix):
            by_fqn.setdefault(index.fqn, []).append((index, loc))
    files: dict[str, Any] = {}
    try:
        for fqn, parts in sorted(by_fqn.items()):
            meta = metadata.state_dict_metadata[fqn]
            key = fqn[len(prefix):]
            for index, loc in parts:
                if loc.file not in files:
                    files[loc.file] = storage.read_mapped(f"{folder}/{loc.file}")
                data = files[loc.file]
                if loc.offset + loc.length > len(data):
                    raise ShardFileError(f"{loc.file} is shorter than its metadata says")
                chunk = memoryview(data)[loc.offset:loc.offset + loc.length]
                if isinstance(meta, BytesStorageMetadata):
                    out[key] = torch.load(io.BytesIO(bytes(chunk)), weights_only=True)
                    continue
                if key not in out:
                    out[key] = torch.empty(tuple(meta.size), dtype=meta.properties.dtype)
                stored = _frombuffer(chunk, meta.properties.dtype, loc.shape)
                target = out[key]
                for dim, (off, n) in enumerate(zip(index.offset or (), stored.shape,
                                                   strict=False)):
                    target = target.narrow(dim, off, n)
                target.copy_(stored)
    finally:
        files.clear()
    return out
