"""Reading a sharded checkpoint: DCP's reader over ``Storage`` (each shard file read once,
memory-mapped locally, in ranged requests remotely), a load planner that never unpickles with
a general unpickler, and a sharded checkpoint's tensors assembled whole in one process."""

from __future__ import annotations

import io
import warnings
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch.distributed.checkpoint import DefaultLoadPlanner, Metadata, StorageReader
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, MetadataIndex
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner
from torch.futures import Future

from ..storage import Storage
from .dcp import Location, ShardFileError


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
