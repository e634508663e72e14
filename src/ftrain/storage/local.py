"""Local files, atomically: a temp file in the same folder, fsync, rename (or a hard link for
create-only), then the folder's fsync. fsspec's own local "transaction" writes to the system
temp folder and does not fsync: it is not used."""

from __future__ import annotations

import errno
import fcntl
import os
import uuid
from collections.abc import Callable
from typing import Any, BinaryIO

from .checksums import HashingWriter, new_hasher

DIRECT_ALIGN = 4096  # O_DIRECT: buffer address, file offset and length in these units
CHUNK = 8 << 20  # bytes per write: hashed just before, while they are in the cache


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def local_atomic_write_stream(path: str, produce: Callable[[BinaryIO], object],
                               create_only: bool, written: dict[str, Any]) -> None:
    """Temp file in the same folder, filled by ``produce``, fsync, then rename (or hard link for
    create-only), folder fsync. The size and checksum (hex) of the bytes go into ``written``
    before the publish, so that a caller refused with FileExistsError can compare them."""
    def fill(tmp: str) -> tuple[int, str]:
        with open(tmp, "wb") as fh:
            sink = HashingWriter(fh)
            produce(sink)
            fh.flush()
            os.fsync(fh.fileno())
        return sink.size, sink.hexdigest()

    _publish(path, fill, create_only, written)


def local_atomic_write_parts(path: str, parts: list[memoryview], size: int, create_only: bool,
                             written: dict[str, Any]) -> None:
    """Publish the first ``size`` bytes of ``parts`` as ``local_atomic_write_stream`` does,
    written with O_DIRECT where the filesystem takes it: the disk reads the buffers themselves,
    with no copy into the page cache and no writeback by the kernel (a 409 MiB state: 15 ms of
    CPU instead of about 100 ms, and none for the kernel's flusher). ``parts`` are page-aligned
    and a multiple of 4096 bytes long, zeros past ``size``; the file is cut to ``size`` after
    the writes. Each chunk is hashed just before it is written. Where O_DIRECT is refused
    (tmpfs, some network filesystems) the same writes go through the page cache."""
    def fill(tmp: str) -> tuple[int, str]:
        # Opened plainly, then switched to O_DIRECT: a filesystem without direct I/O refuses
        # O_DIRECT at open only after creating the file (tmpfs before Linux 6.6).
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            direct = _direct_on(fd)
            hasher, pos = new_hasher(), 0
            for part in parts:
                for start in range(0, len(part), CHUNK):
                    chunk = part[start:start + CHUNK]
                    keep = max(0, min(len(chunk), size - pos))  # the file's bytes in it
                    if keep:
                        hasher.update(chunk[:keep])
                    if direct:  # whole pages, the zeros past the end too (cut off below)
                        direct = _write_all(fd, chunk, direct)
                    elif keep:
                        _write_all(fd, chunk[:keep], direct)
                    pos += len(chunk)
            os.ftruncate(fd, size)
            os.fsync(fd)
        finally:
            os.close(fd)
        return size, hasher.hexdigest()

    _publish(path, fill, create_only, written)


def _publish(path: str, fill: Callable[[str], tuple[int, str]], create_only: bool,
             written: dict[str, Any]) -> None:
    """``fill(tmp)`` writes and fsyncs a temp file in ``path``'s folder and returns its size
    and checksum (put into ``written``); then the temp file is published under ``path``."""
    folder = os.path.dirname(path) or "."
    if not os.path.isdir(folder):
        os.makedirs(folder, exist_ok=True)
        fsync_dir(os.path.dirname(folder.rstrip("/")) or ".")
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex[:12]}")
    try:
        size, digest = fill(tmp)
        written.update(size=size, digest=digest)
        if create_only:
            # link() fails with EEXIST when the name is taken: an atomic create-only publish.
            os.link(tmp, path)
            os.unlink(tmp)
        else:
            os.replace(tmp, path)
        fsync_dir(folder)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _direct_on(fd: int) -> bool:
    """Switch ``fd`` to O_DIRECT; False where the platform or the filesystem refuses it."""
    if not hasattr(os, "O_DIRECT"):
        return False
    try:
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_DIRECT)
    except OSError as e:
        if e.errno != errno.EINVAL:
            raise
        return False
    return True


def _write_all(fd: int, body: memoryview, direct: bool) -> bool:
    """Write all of ``body``; returns whether the file is still in O_DIRECT mode (a write it
    refuses, EINVAL, is retried through the page cache, and the rest goes that way too)."""
    while len(body):
        try:
            n = os.write(fd, body)
        except OSError as e:
            if not direct or e.errno != errno.EINVAL:
                raise
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_DIRECT)
            direct = False
            continue
        body = body[n:]
    return direct
