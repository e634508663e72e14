"""The only module that moves bytes: one fsspec code path for local folders, S3 and memory://.

Paths stay strings (URIs). Local writes are temp file + fsync + rename (or hard link for
create-only) + folder fsync; remote writes upload a finished buffer with ``pipe_file`` (for S3
``mode="create"`` sends ``If-None-Match: *``), never through ``fs.open(..., "wb")``, which would
publish a partial object if the writer fails half-way. Every call retries transient failures
with exponential backoff and jitter, bounded in attempts and time.

This module is the one retry layer. botocore's and s3fs's own retries are switched off for S3
(unless the user configures them through storage options or ``AWS_MAX_ATTEMPTS``): nested
retries would multiply (5 s3fs x 5 botocore x our attempts), defeat the time bound and hide
failures from the log.
"""

from __future__ import annotations

import errno
import io
import logging
import mmap
import os
import time
import uuid
from collections.abc import Callable
from typing import Any, BinaryIO, TypeVar

import fsspec

from .checksums import HashingWriter, checksum
from .errors import (
    _PERMANENT,
    RetryPolicy,
    StorageAccessError,
    StorageError,
    _errno_in_chain,
    _refusal_answer,
    is_transient,
    redact,
    s3_refusal,
)
from .local import local_atomic_write_parts, local_atomic_write_stream
from .tuning import s3_defaults, tuning

log = logging.getLogger(__name__)
T = TypeVar("T")


class Storage:
    """Byte-level access below one root URI (a local folder, ``s3://bucket/prefix``, ...).

    Relative paths use "/" on every backend. Methods raise FileNotFoundError / FileExistsError
    as such, StorageAccessError (at once, never retried) when S3 refuses the bucket or the
    credentials, and StorageError for failures that survived the retries.
    """

    def __init__(self, root: str, options: dict[str, Any] | None = None,
                 retry: RetryPolicy | None = None) -> None:
        self.root_uri = root.rstrip("/") or root
        self.options = dict(options or {})
        self.retry = retry or tuning().retry
        self.protocol = _protocol(self.root_uri)
        self.is_local = self.protocol in ("file", "local")
        self._fs = None
        self._root = ""
        self._pid = -1

    # ------------------------------------------------------------------ plumbing
    @property
    def fs(self):
        # A new instance per process: s3fs instances are not fork-safe, and a fresh one has no
        # stale listing cache from another process.
        if self._fs is None or self._pid != os.getpid():
            opts = dict(self.options)
            # s3fs's own retry loop (a class attribute, not an option): this module retries.
            s3fs_retries = opts.pop("retries", 1) if self.protocol == "s3" else None
            if self.protocol == "s3":
                opts.setdefault("use_listings_cache", False)
                opts.setdefault("skip_instance_cache", True)
                s3_defaults(opts)
            self._fs, self._root = fsspec.core.url_to_fs(self.root_uri, **opts)
            if s3fs_retries is not None:
                self._fs.retries = int(s3fs_retries)
            self._root = self._root.rstrip("/") if self._root not in ("/", "") else self._root
            self._pid = os.getpid()
        return self._fs

    def full(self, rel: str = "") -> str:
        """Backend path (no protocol) of ``rel`` below the root."""
        _ = self.fs
        rel = rel.strip("/")
        if not rel:
            return self._root
        return f"{self._root}/{rel}" if self._root not in ("", "/") else f"{self._root}{rel}"

    def uri(self, rel: str = "") -> str:
        """The user-facing URI of ``rel`` below the root."""
        rel = rel.strip("/")
        return f"{self.root_uri}/{rel}" if rel else self.root_uri

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        policy = self.retry
        start = time.monotonic()
        for attempt in range(1, policy.attempts + 1):
            try:
                return fn()
            except Exception as e:  # noqa: BLE001 - classified below
                refused = self._refusal(what, e)
                if refused is not None:
                    raise refused from e
                if isinstance(e, _PERMANENT):
                    raise
                elapsed = time.monotonic() - start
                code = _errno_in_chain(e) if self.is_local else None
                if code in (errno.ENOSPC, errno.EDQUOT):  # not transient; say what it means
                    raise StorageError(f"{what}: the disk holding {self.root_uri} is full "
                                       f"({os.strerror(code)}): free space there, or use "
                                       "another folder") from e
                if not is_transient(e):
                    raise StorageError(f"{what}: {redact(str(e)) or type(e).__name__}") from e
                if attempt == policy.attempts or elapsed >= policy.deadline:
                    raise StorageError(f"{what}: still failing after {attempt} attempts "
                                       f"({elapsed:.1f}s): {redact(str(e))}") from e
                delay = policy.delay(attempt, elapsed)
                log.warning("%s failed (%s: %s); retry %d/%d in %.2fs", what, type(e).__name__,
                            redact(str(e))[:200], attempt, policy.attempts - 1, delay,
                            extra={"fields": {"event": "retry", "what": what,
                                              "attempt": attempt, "delay_s": delay}})
                if hasattr(self._fs, "invalidate_cache"):
                    self._fs.invalidate_cache()
                time.sleep(delay)
        raise AssertionError("unreachable")

    def _refusal(self, what: str, e: BaseException) -> StorageAccessError | None:
        """A StorageAccessError when S3 refuses this configuration for good: the bucket does
        not exist, or the credentials may not use it (403). None for any other error."""
        if self.protocol != "s3":
            return None
        return s3_refusal(what, e, self.full().split("/", 1)[0], self.root_uri)

    def _fresh(self) -> None:
        if hasattr(self.fs, "invalidate_cache"):
            self.fs.invalidate_cache()

    # ------------------------------------------------------------------ reads
    def listdir(self, rel: str = "") -> list[str]:
        """Names directly below ``rel`` (files and folders), read afresh; [] if it is absent."""
        path = self.full(rel)

        def go() -> list[str]:
            self._fresh()
            try:
                entries = self.fs.ls(path, detail=False, **({"refresh": True}
                                                          if self.protocol == "s3" else {}))
            except FileNotFoundError as e:
                if _refusal_answer(e) is not None:
                    raise  # no bucket at all, not an empty folder
                return []
            names = []
            for e in entries:
                name = e.rstrip("/").rsplit("/", 1)[-1]
                if name and e.rstrip("/") != path.rstrip("/"):
                    names.append(name)
            return sorted(set(names))

        return self._call(f"list {self.uri(rel)}", go)

    def exists(self, rel: str) -> bool:
        path = self.full(rel)

        def go() -> bool:
            self._fresh()
            return self.fs.exists(path)

        return self._call(f"check {self.uri(rel)}", go)

    def read(self, rel: str) -> bytes:
        path = self.full(rel)
        return self._call(f"read {self.uri(rel)}", lambda: self.fs.cat_file(path))

    def read_range(self, rel: str, start: int, end: int) -> bytes:
        """Bytes ``start`` to ``end`` (exclusive) of the file (fewer where it is shorter). On
        S3 a ranged GET per part (``default_block_size``), in parallel, as a whole-file read
        does."""
        path = self.full(rel)
        part = int(getattr(self.fs, "default_block_size", 0) or tuning().s3_part_size)
        starts = list(range(start, end, part)) or [start]
        ends = [min(s + part, end) for s in starts]

        def go() -> bytes:
            if len(starts) == 1:
                return self.fs.cat_file(path, start=start, end=end)
            return b"".join(self.fs.cat_ranges([path] * len(starts), starts, ends,
                                               on_error="raise"))

        return self._call(f"read {self.uri(rel)} [{start}:{end}]", go)

    def read_mapped(self, rel: str) -> bytes | mmap.mmap:
        """The file's bytes; a local file is memory-mapped read-only (no copy: hashing it reads
        the pages once, and ``torch.load(..., mmap=True)`` maps the same page cache)."""
        if not self.is_local:
            return self.read(rel)

        def go() -> bytes | mmap.mmap:
            with open(self.full(rel), "rb") as fh:
                if os.fstat(fh.fileno()).st_size == 0:
                    return b""
                return mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)

        return self._call(f"read {self.uri(rel)}", go)

    def local_path(self, rel: str) -> str | None:
        """The file's path on this machine, None for a remote backend."""
        return self.full(rel) if self.is_local else None

    def info(self, rel: str) -> dict[str, Any]:
        path = self.full(rel)

        def go() -> dict[str, Any]:
            self._fresh()
            return self.fs.info(path)

        return self._call(f"stat {self.uri(rel)}", go)

    def modified(self, rel: str) -> float | None:
        """Modification time (epoch seconds) of a file, None when the backend cannot tell."""
        try:
            info = self.info(rel)
        except FileNotFoundError:
            return None
        for key in ("mtime", "LastModified", "last_modified", "created"):
            v = info.get(key)
            if v is None:
                continue
            if hasattr(v, "timestamp"):
                return float(v.timestamp())
            try:
                return float(v)
            except (TypeError, ValueError):
                continue
        return None

    def walk(self, rel: str = "") -> dict[str, int]:
        """Every file below ``rel`` (recursively) as {relative path: size}, read afresh."""
        base = self.full(rel).rstrip("/")

        def go() -> dict[str, int]:
            self._fresh()
            found = self.fs.find(base, detail=True)
            return {p[len(base):].lstrip("/"): int(i.get("size") or 0) for p, i in found.items()
                    if i.get("type", "file") != "directory" and p.startswith(base + "/")}

        return self._call(f"list {self.uri(rel)}", go)

    def download(self, rel: str, local_path: str) -> None:
        """Copy one file to a local path, atomically (temp file + rename), checking its size."""
        path = self.full(rel)
        tmp = f"{local_path}.part-{uuid.uuid4().hex[:8]}"
        os.makedirs(os.path.dirname(local_path) or ".", exist_ok=True)

        def go() -> None:
            self.fs.get_file(path, tmp)
            size = self.fs.size(path)
            if os.path.getsize(tmp) != size:  # a cut-off transfer: retried like a reset
                raise ConnectionResetError(f"{self.uri(rel)}: got {os.path.getsize(tmp)} of "
                                           f"{size} bytes")
            os.replace(tmp, local_path)

        try:
            self._call(f"download {self.uri(rel)}", go)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    # ------------------------------------------------------------------ writes
    def write(self, rel: str, data: bytes | bytearray | memoryview,
              create_only: bool = False) -> tuple[int, str]:
        """Publish ``data`` at ``rel`` atomically: readers see all of it or nothing. Returns its
        size and checksum (``CHECKSUM``, hex), as ``write_stream`` does.

        ``create_only``: raise FileExistsError instead of replacing an existing file (two writers
        can never overwrite each other's commit). A file that already holds exactly ``data``
        counts as written: an earlier attempt of this very write may have landed with its answer
        lost (a reset after the upload), and its retry is then refused with 412.
        """
        return self.write_stream(rel, lambda fh: fh.write(data), create_only)

    def write_stream(self, rel: str, produce: Callable[[BinaryIO], object],
                     create_only: bool = False) -> tuple[int, str]:
        """Publish what ``produce(sink)`` writes into ``sink``, atomically, as ``write`` does.

        Returns the size and checksum (``CHECKSUM``, hex) of the published bytes, hashed as
        they are written:
        no second pass over them. A local file is written straight into its temp file, without
        an in-memory copy of the whole payload; ``produce`` runs again if that is retried. A
        remote file is produced into a buffer once, then uploaded (retried as a whole).
        """
        written: dict[str, Any] = {}
        if self.is_local:
            def publish() -> None:
                self._call(f"write {self.uri(rel)}", lambda: local_atomic_write_stream(
                    self.full(rel), produce, create_only, written))
        else:
            buf = io.BytesIO()
            sink = HashingWriter(buf)
            try:
                produce(sink)
            except Exception as e:  # noqa: BLE001 - reported like a failed local write
                raise StorageError(f"write {self.uri(rel)}: "
                                   f"{redact(str(e)) or type(e).__name__}") from e
            written.update(size=sink.size, digest=sink.hexdigest())
            body = buf.getvalue()  # botocore takes bytes, not the buffer's memoryview
            del buf

            def publish() -> None:
                self._upload(rel, body, create_only)
        return self._publish(rel, publish, written)

    def write_parts(self, rel: str, parts: list[memoryview], size: int,
                    create_only: bool = False) -> tuple[int, str]:
        """Publish the first ``size`` bytes of ``parts`` (page-aligned host memory, each a
        multiple of 4096 bytes long) atomically, as ``write`` does; returns their size and
        checksum. A local file is written from the buffers with O_DIRECT where the filesystem
        takes it (local.local_atomic_write_parts); a remote one is uploaded as
        ``write_stream`` does."""
        if not self.is_local:
            def produce(sink: BinaryIO) -> None:
                left = size
                for part in parts:
                    body = part[:left]
                    sink.write(body)
                    left -= len(body)

            return self.write_stream(rel, produce, create_only)
        written: dict[str, Any] = {}

        def publish() -> None:
            self._call(f"write {self.uri(rel)}", lambda: local_atomic_write_parts(
                self.full(rel), parts, size, create_only, written))

        return self._publish(rel, publish, written)

    def _publish(self, rel: str, publish: Callable[[], None],
                 written: dict[str, Any]) -> tuple[int, str]:
        try:
            publish()
        except FileExistsError:
            # Only a publish refused after the bytes were written may have landed before.
            if "size" not in written or not self._holds(rel, written["size"],
                                                        written["digest"]):
                raise
            log.info("%s already holds these exact bytes (an earlier attempt landed); "
                     "counting it as written", self.uri(rel))
        return written["size"], written["digest"]

    def _upload(self, rel: str, body: bytes, create_only: bool) -> None:
        path = self.full(rel)

        def go() -> None:
            if create_only and self.protocol != "s3":
                # Backends without conditional writes (memory://, used by tests): best effort.
                self._fresh()
                if self.fs.exists(path):
                    raise FileExistsError(f"{self.uri(rel)} already exists")
            kwargs: dict[str, Any] = {}
            if self.protocol == "s3":
                # Multipart at two parts and up, max_concurrency parts in flight (a failed part
                # aborts the whole upload: nothing partial is ever visible).
                kwargs["chunksize"] = self.fs.default_block_size
                if create_only:
                    kwargs["mode"] = "create"
            self.fs.pipe_file(path, body, **kwargs)

        self._call(f"upload {self.uri(rel)}", go)

    def _holds(self, rel: str, size: int, digest: str) -> bool:
        try:
            existing = self.read(rel)
        except FileNotFoundError:
            return False
        return len(existing) == size and checksum(existing) == digest

    def remove(self, rel: str) -> None:
        """Delete one file; a missing file is not an error."""
        path = self.full(rel)

        def go() -> None:
            try:
                self.fs.rm_file(path)
            except FileNotFoundError:
                pass

        self._call(f"delete {self.uri(rel)}", go)

    def remove_tree(self, rel: str) -> None:
        """Delete a folder and everything below it; missing is not an error."""
        path = self.full(rel)

        def go() -> None:
            self._fresh()
            try:
                self.fs.rm(path, recursive=True)
            except FileNotFoundError:
                pass
            if self.is_local and os.path.isdir(path):
                os.rmdir(path)

        self._call(f"delete {self.uri(rel)}", go)


def _protocol(uri: str) -> str:
    if "://" not in uri:
        return "file"
    p = uri.split("://", 1)[0].lower()
    return {"s3a": "s3"}.get(p, p)
