"""Local files, atomically: a temp file in the same folder, fsync, rename (or a hard link for
create-only), then the folder's fsync. fsspec's own local "transaction" writes to the system
temp folder and does not fsync: it is not used."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from typing import Any, BinaryIO

from .checksums import HashingWriter


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
    folder = os.path.dirname(path) or "."
    if not os.path.isdir(folder):
        os.makedirs(folder, exist_ok=True)
        fsync_dir(os.path.dirname(folder.rstrip("/")) or ".")
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex[:12]}")
    try:
        with open(tmp, "wb") as fh:
            sink = HashingWriter(fh)
            produce(sink)
            fh.flush()
            os.fsync(fh.fileno())
        written.update(size=sink.size, digest=sink.hexdigest())
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
