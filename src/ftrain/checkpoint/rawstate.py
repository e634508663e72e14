"""The raw state file (checkpoint format 4): the snapshot's tensors as the bytes they already
are in host memory, written from there, without a serialiser in between.

``torch.save`` builds a zip whose records the persister copied through Python into the page
cache, and the kernel then wrote them out: on a 2-core machine that CPU is taken from
training. Here a save's tensors are staged into one page-aligned host buffer (``Arena``, each
tensor at a 64-byte aligned offset), and the file is that buffer behind a small header, so the
persister writes it with ``O_DIRECT`` (storage/local.py: the disk reads the buffer itself; no
page-cache copy) and hashes it in the same pass. Layout::

    b"FTRAW01\\n"        8 bytes
    header length       8 bytes, little-endian
    header              torch.save({"skeleton", "tensors", "byteorder"}): the state with each
                        tensor replaced by {TENSOR_KEY: i}, and each tensor's dtype, shape,
                        offset and size
    zeros               up to the next multiple of 4096: the data offset
    tensor bytes        tensor i at the data offset + its offset; zeros between tensors

Loading maps the file copy-on-write (no copy of the state) and reads the header with
``weights_only=True``: no code runs; every entry of the header is checked against the file
(a header that lies is refused, never read past). A state holding a tensor this layout cannot
carry (sparse, a tensor subclass) is staged per tensor and written with ``torch.save`` as
before (format 2), and so is a state holding a dict of its own with the key TENSOR_KEY (it
would read back as a tensor).
"""

from __future__ import annotations

import io
import mmap
import os
import sys
from dataclasses import dataclass
from typing import Any

import torch

from .staging import HostBuffers

MAGIC = b"FTRAW01\n"
ALIGN = 4096  # the page, and O_DIRECT's alignment of buffers, offsets and lengths
TENSOR_ALIGN = 64
TENSOR_KEY = "__ftrain_raw_tensor__"


def _round_up(n: int, to: int) -> int:
    return -(-n // to) * to


def _plain(t: torch.Tensor) -> bool:
    """A dense tensor the raw layout can carry as its bytes."""
    return (type(t) in (torch.Tensor, torch.nn.Parameter) and t.layout == torch.strided
            and not t.is_quantized and not t.is_nested and t.device.type != "meta")


def _map_tensors(obj: Any, fn: Any, reserved: bool = False) -> Any:
    """``obj`` rebuilt with ``fn(t)`` in place of every tensor ``t``: dicts, lists and tuples
    walked in order, every other value kept. ``reserved``: a dict with the key TENSOR_KEY
    raises LookupError (the skeleton could not tell it from a tensor's place)."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, dict):
        if reserved and TENSOR_KEY in obj:
            raise LookupError(TENSOR_KEY)
        return {k: _map_tensors(v, fn, reserved) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_map_tensors(v, fn, reserved) for v in obj)
    return obj


def aligned_bytes(nbytes: int, pin: bool, shared: bool = False) -> torch.Tensor:
    """``nbytes`` (a multiple of ALIGN) of uint8 host memory starting on a page boundary;
    ``shared``: in shared memory (another process may write it)."""
    for extra in (0, ALIGN):  # pinned and large allocations mostly start on a page already
        raw = torch.empty(nbytes + extra, dtype=torch.uint8, pin_memory=pin)
        if shared:
            raw.share_memory_()
        skip = (-raw.data_ptr()) % ALIGN
        if skip <= extra:
            return raw[skip:skip + nbytes]
        del raw
    raise AssertionError("unreachable")


class Arena:
    """The host buffers of one snapshot set: every tensor of the state in one page-aligned
    buffer, reused from save to save while the state's tensors keep their dtypes and shapes.
    A state with a tensor the raw layout cannot carry is staged per tensor (HostBuffers)."""

    def __init__(self, shared: bool = False) -> None:
        self.shared = shared  # the buffer in shared memory (a writer process may read it)
        self.buffer: torch.Tensor | None = None  # uint8, page-aligned, a multiple of ALIGN long
        self.used = 0  # bytes of ``buffer`` the tensors take
        self._layout: list[tuple[torch.dtype, tuple[int, ...]]] = []
        self._views: list[torch.Tensor] = []
        self._fallback = HostBuffers()

    def copy(self, state: Any) -> Any:
        """``state`` with every tensor copied into this arena (non-blocking from a GPU: the
        caller synchronises)."""
        found: list[torch.Tensor] = []
        _map_tensors(state, found.append)
        if not all(_plain(t) for t in found):
            return self._fallback.copy(state)
        layout = [(t.dtype, tuple(t.shape), t.device.type == "cuda") for t in found]
        if layout != self._layout or self.buffer is None:
            self._allocate(found, layout)
        views = iter(self._views)
        return _map_tensors(state, lambda t: next(views).copy_(t.detach(), non_blocking=True))

    def _allocate(self, found: list[torch.Tensor], layout: list) -> None:
        offsets, end = [], 0
        for t in found:
            offsets.append(end)
            end = _round_up(end + t.numel() * t.element_size(), TENSOR_ALIGN)
        pin = any(t.device.type == "cuda" for t in found)
        self.buffer, self._views = None, []  # the old one freed before the new one is taken
        self.buffer = aligned_bytes(_round_up(max(end, 1), ALIGN), pin, self.shared)
        self.buffer.zero_()  # the gaps between tensors are in the file: zeros, not old heap
        self.used = end
        self._views = [self.buffer[o:o + t.numel() * t.element_size()].view(t.dtype)
                       .view(t.shape) for o, t in zip(offsets, found, strict=True)]
        self._layout = layout

    def holds(self, t: torch.Tensor) -> bool:
        """Whether ``t`` is one of this arena's views."""
        if self.buffer is None or t.device.type != "cpu" or not t.is_contiguous():
            return False
        if t.numel() == 0:
            return any(v is t for v in self._views)  # an empty view points nowhere
        start = t.data_ptr() - self.buffer.data_ptr()
        return 0 <= start and start + t.numel() * t.element_size() <= self.used


@dataclass
class RawFile:
    """A raw state file ready to write: ``parts`` (page-aligned host memory, each a multiple of
    ALIGN long) hold the file's ``size`` bytes first, then zeros to the end of the last part."""

    parts: list[torch.Tensor]
    size: int

    def views(self) -> list[memoryview]:
        return [memoryview(p.numpy()).cast("B") for p in self.parts]


def encode(state: Any, arena: Arena) -> RawFile | None:
    """The raw file of ``state``, a snapshot staged in ``arena``; None when it is not (a state
    staged per tensor), or when the state has a dict of its own with the key TENSOR_KEY: the
    caller writes it with torch.save."""
    entries: list[tuple[str, list[int], int, int]] = []

    def entry(t: torch.Tensor) -> dict[str, int]:
        if not arena.holds(t):
            raise LookupError
        offset = t.data_ptr() - arena.buffer.data_ptr() if t.numel() else 0
        entries.append((str(t.dtype).removeprefix("torch."), list(t.shape), offset,
                        t.numel() * t.element_size()))
        return {TENSOR_KEY: len(entries) - 1}

    try:
        skel = _map_tensors(state, entry, reserved=True)
    except LookupError:
        return None
    buf = io.BytesIO()
    torch.save({"skeleton": skel, "tensors": entries, "byteorder": sys.byteorder}, buf)
    body = buf.getvalue()
    data_offset = _round_up(len(MAGIC) + 8 + len(body), ALIGN)
    head = aligned_bytes(data_offset, pin=False)
    head.zero_()
    view = memoryview(head.numpy()).cast("B")
    view[:8] = MAGIC
    view[8:16] = len(body).to_bytes(8, "little")
    view[16:16 + len(body)] = body
    data = arena.buffer[:_round_up(max(arena.used, 1), ALIGN)]
    return RawFile([head, data], data_offset + arena.used)


def is_raw(blob: bytes | memoryview | mmap.mmap) -> bool:
    return bytes(blob[:len(MAGIC)]) == MAGIC


def load_state(blob: bytes | memoryview | mmap.mmap, path: str | None = None) -> Any:
    """The state of a raw state file: from ``path`` mapped copy-on-write when given (its
    tensors share the page cache until written), else from a copy of ``blob``. Raises
    ValueError for a malformed file."""
    if path is not None:
        fd = os.open(path, os.O_RDONLY)
        try:
            source: Any = mmap.mmap(fd, 0, access=mmap.ACCESS_COPY)
        finally:
            os.close(fd)
    else:
        source = bytearray(blob)
    size = len(source)
    if size < 16 or bytes(source[:8]) != MAGIC:
        raise ValueError("not a raw state file")
    n = int.from_bytes(source[8:16], "little")
    if 16 + n > size:
        raise ValueError(f"header of {n} bytes runs past the file's end")
    header = torch.load(io.BytesIO(bytes(source[16:16 + n])), weights_only=True)
    if not isinstance(header, dict) or not isinstance(header.get("tensors"), list) or \
            "skeleton" not in header:
        raise ValueError("the header is not a raw state file's")
    if header.get("byteorder") != sys.byteorder:
        raise ValueError(f"written on a {header.get('byteorder')}-endian machine, this one is "
                         f"{sys.byteorder}-endian")
    data_offset = _round_up(16 + n, ALIGN)
    tensors = [_tensor(source, entry, data_offset, size) for entry in header["tensors"]]

    def rebuild(obj: Any) -> Any:
        if isinstance(obj, dict):
            if len(obj) == 1 and TENSOR_KEY in obj:
                i = obj[TENSOR_KEY]
                if type(i) is not int or not 0 <= i < len(tensors):
                    raise ValueError(f"the header names tensor {i!r} of {len(tensors)}")
                return tensors[i]
            return {k: rebuild(v) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return type(obj)(rebuild(v) for v in obj)
        return obj

    return rebuild(header["skeleton"])


def _tensor(source: Any, entry: Any, data_offset: int, size: int) -> torch.Tensor:
    """One tensor of the header's table, checked against the file: its dtype, shape and size
    agree, and its bytes lie inside the file at an offset its dtype can be read at."""
    if not isinstance(entry, (list, tuple)) or len(entry) != 4:
        raise ValueError(f"a tensor entry of the header is malformed: {str(entry)[:100]}")
    dtype_name, shape, offset, nbytes = entry
    dtype = getattr(torch, dtype_name, None) if isinstance(dtype_name, str) else None
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {dtype_name!r}")
    if not isinstance(shape, (list, tuple)) or not all(type(d) is int and d >= 0
                                                        for d in shape):
        raise ValueError(f"a tensor's shape is malformed: {str(shape)[:100]}")
    itemsize = dtype.itemsize
    numel = 1
    for d in shape:
        numel *= d
    if type(offset) is not int or type(nbytes) is not int or nbytes != numel * itemsize:
        raise ValueError(f"a tensor of shape {list(shape)} and dtype {dtype_name} is said to "
                         f"take {nbytes!r} bytes")
    start = data_offset + offset
    if offset < 0 or offset % max(itemsize, 1) or start + nbytes > size:
        raise ValueError(f"a tensor's bytes [{start}, {start + nbytes}) lie outside the file "
                         f"({size} bytes) or off its dtype's alignment")
    if nbytes == 0:
        return torch.empty(shape, dtype=dtype)
    flat = torch.frombuffer(source, dtype=torch.uint8, count=nbytes, offset=start)
    return flat.view(dtype).view(shape)
