"""The checkpoints below one root: list, read and verify, commit (create-only manifest),
retain. Everything about the format itself is in format.py; bytes move through storage/."""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import time
import uuid
from typing import Any

import torch

from ..storage import CHECKSUM, Storage, StorageError
from .format import (
    MANIFEST,
    STEP_DIR,
    CorruptCheckpoint,
    Entry,
    FileEntry,
    Loaded,
    Manifest,
    Producer,
    step_dirname,
)
from .rawstate import RawFile, is_raw, load_state

log = logging.getLogger(__name__)

BEST = "best"  # ROOT/best: the best checkpoint by the run's --best-metric (load_uri)
# The reason of a survivor's checkpoint of an epoch's end taken before its evaluation (a peer
# died in it): the evaluated one of the same step replaces it (CheckpointStore.commit).
UNEVALUATED = "peer_failed_unevaluated"


class CheckpointStore:
    """The checkpoints below one root URI."""

    def __init__(self, storage: Storage) -> None:
        self.storage = storage
        self.last_commit_bytes = 0  # size of the files of the newest commit (for the log)

    @property
    def uri(self) -> str:
        return self.storage.root_uri

    # ------------------------------------------------------------------ listing
    def step_dirs(self) -> list[tuple[int, str]]:
        """(step, folder name), newest first, listed afresh."""
        out = []
        for name in self.storage.listdir():
            m = STEP_DIR.match(name)
            if m:
                out.append((int(m.group(1)), name))
        return sorted(out, reverse=True)

    def read_manifest(self, name: str) -> Manifest:
        """Raises CorruptCheckpoint when absent or malformed."""
        try:
            raw = self.storage.read(f"{name}/{MANIFEST}")
        except FileNotFoundError:
            raise CorruptCheckpoint("no manifest (never committed, or a crashed writer)") from None
        return Manifest.parse(raw)

    def read_verified(self, name: str, manifest: Manifest | None = None,
                      shards: str = "full") -> tuple[Manifest, dict[str, Any]]:
        """Manifest and the bytes of every file it lists, each checked for size and checksum.

        A sharded checkpoint's shard files: with ``shards="full"`` checked like the others
        (not returned); with ``"size"`` only their sizes are (the ranks share the checksums:
        ``verify_files``)."""
        manifest = self.read_manifest(name) if manifest is None else manifest
        shard_files = set(manifest.shards) if manifest.sharded else set()
        blobs: dict[str, bytes] = {}
        for fname, meta in manifest.files.items():
            if fname in shard_files:
                if shards == "size":
                    self._check_size(name, fname, meta)
                else:
                    self.verify_files(name, manifest, [fname], raise_=True)
                continue
            blobs[fname] = self._read_checked(name, fname, meta)
        return manifest, blobs

    def _read_checked(self, name: str, fname: str, meta: FileEntry) -> Any:
        try:
            data = self.storage.read_mapped(f"{name}/{fname}")
        except FileNotFoundError:
            raise CorruptCheckpoint(f"{fname} is missing") from None
        meta.verify(fname, data)
        return data

    def _check_size(self, name: str, fname: str, meta: FileEntry) -> None:
        try:
            size = int(self.storage.info(f"{name}/{fname}").get("size") or 0)
        except FileNotFoundError:
            raise CorruptCheckpoint(f"{fname} is missing") from None
        if size != meta.size:
            raise CorruptCheckpoint(f"{fname} has {size} bytes, manifest says {meta.size} "
                                    "(truncated?)")

    def verify_files(self, name: str, manifest: Manifest, files: list[str],
                     raise_: bool = False, keep: dict[str, Any] | None = None) -> str | None:
        """Check ``files`` of checkpoint ``name`` (one at a time) against the manifest. Returns
        the first problem (naming the file), None when all match; with ``raise_`` raises it as
        CorruptCheckpoint. ``keep``: on remote storage, the verified bytes go there by file
        name (a local file is mapped: reading it again costs no download)."""
        for fname in files:
            try:
                data = self._read_checked(name, fname, manifest.files[fname])
            except CorruptCheckpoint as e:
                if raise_:
                    raise
                return str(e)
            if keep is not None and not self.storage.is_local:
                keep[fname] = data
            del data
        return None

    def load(self, name: str, shards: str = "full") -> Loaded:
        """Verify and deserialize one checkpoint; raises CorruptCheckpoint with the reason.
        ``shards="size"``: a sharded checkpoint's shard files are only checked for size (the
        caller verifies their checksums, e.g. shared between ranks)."""
        manifest, blobs = self.read_verified(name, shards=shards)
        return self._deserialize(name, manifest, blobs)

    def _deserialize(self, name: str, manifest: Manifest, blobs: dict[str, Any]) -> Loaded:
        try:
            blob = blobs[manifest.state_file]
            path = self.storage.local_path(f"{name}/{manifest.state_file}")
            if is_raw(blob):  # format 4; the file mapped copy-on-write when it is local
                state = load_state(blob, path)
            elif path is not None and len(blob):
                # Verified through the same page cache a moment ago; files are never rewritten
                # in place. The tensors map the file (copy-on-write): no copy of the state.
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            else:
                state = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
        except KeyError:
            raise CorruptCheckpoint("manifest's state_file is not among its files") from None
        except Exception as e:  # noqa: BLE001 - UnpicklingError, RuntimeError (bad zip), ...
            # weights_only=True refuses anything but tensors and plain containers: no code runs.
            raise CorruptCheckpoint(f"state file cannot be loaded safely: "
                                    f"{type(e).__name__}: {str(e)[:200]}") from None
        try:
            train_state = json.loads(bytes(blobs[manifest.train_state_file]))
        except (KeyError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CorruptCheckpoint(f"train state unreadable: {e}") from None
        if manifest.sharded:
            from .dcp import decode_metadata

            if not isinstance(state, dict):
                raise CorruptCheckpoint("state file holds no state")
            try:
                dcp = decode_metadata(blobs[manifest.dcp_metadata_file])
            except (KeyError, ValueError) as e:
                raise CorruptCheckpoint(f"DCP metadata unreadable: {e}") from None
            missing = {loc.file for loc in dcp.storage_data.values()} - set(manifest.shards)
            if missing:
                raise CorruptCheckpoint(f"DCP metadata names files the manifest does not list: "
                                        f"{sorted(missing)}")
            return Loaded(name, self.storage.uri(name), manifest, state, train_state, dcp,
                          self.storage)
        if not isinstance(state, dict) or "model" not in state:
            raise CorruptCheckpoint("state file holds no model state")
        return Loaded(name, self.storage.uri(name), manifest, state, train_state)

    def latest(self, skip: frozenset[str] | set[str] = frozenset(), shards: str = "full"
               ) -> Loaded | None:
        """Newest valid checkpoint; corrupt or partial ones are logged loudly and skipped
        (``skip``: URIs of checkpoints already found invalid). ``shards``: as for ``load``.

        Raises StorageError when storage fails (after retries): an unreachable checkpoint is
        not a corrupt one, and falling back past it would throw work away.
        """
        for _step, name in self.step_dirs():
            if self.storage.uri(name) in skip:
                continue
            try:
                return self.load(name, shards=shards)
            except CorruptCheckpoint as e:
                log.warning("SKIPPING checkpoint %s: %s", self.storage.uri(name), e)
        return None

    def committed_names(self) -> list[str]:
        """Step folders that hold a manifest file (valid or not), newest first."""
        return [name for _step, name in self.step_dirs()
                if self.storage.exists(f"{name}/{MANIFEST}")]

    def best(self) -> Loaded | None:
        """The best valid checkpoint by the --best-metric its run recorded, chosen from the
        newest valid checkpoint's history (corrupt ones are skipped, loudly). None: no valid
        checkpoint. FileNotFoundError: the run names no --best-metric, or no checkpoint of an
        evaluated step is left."""
        from .best import Selection

        latest = self.latest()
        if latest is None:
            return None
        selection = Selection.from_train_state(latest.train_state)
        if selection is None:
            raise FileNotFoundError(f"{self.uri}: its run has no --best-metric, so no "
                                    "checkpoint is best; name a step folder instead")
        steps = [s for s, _ in self.step_dirs() if s <= latest.manifest.step]
        for step in selection.ranked(latest.train_state, steps):
            if step == latest.manifest.step:
                return latest
            try:
                return self.load(step_dirname(step))
            except CorruptCheckpoint as e:
                log.warning("SKIPPING checkpoint %s: %s", self.storage.uri(step_dirname(step)), e)
        raise FileNotFoundError(f"{self.uri}: no checkpoint of an evaluated step is left "
                                f"(--best-metric {selection.metric})")

    def entries(self) -> list[Entry]:
        """Every step folder with its validity (reads and hashes every file once)."""
        out = []
        for step, name in self.step_dirs():
            entry = Entry(name, self.storage.uri(name), step, False)
            try:
                # What the manifest says is shown even when the files do not match it.
                entry.manifest = manifest = self.read_manifest(name)
                entry.created = manifest.created_unix
                entry.size = sum(m.size for m in manifest.files.values())
                _, blobs = self.read_verified(name, manifest)
                self._deserialize(name, manifest, blobs)
                entry.valid = True
            except CorruptCheckpoint as e:
                entry.reason = str(e)
            except StorageError as e:
                entry.reason = f"storage error: {e}"
            out.append(entry)
        return out

    # ------------------------------------------------------------------ commit
    def commit(self, step: int, files: dict[str, bytes | memoryview | Producer | RawFile],
               manifest: Manifest, writer: str,
               written: dict[str, dict[str, Any]] | None = None) -> bool:
        """Write ``files`` into the step's folder, then ``manifest`` (with every file's size and
        checksum, the writer and the time), create-only.

        A file is given as its bytes, as a ``Producer``: a function that writes the file's
        bytes into the file object it is given (``torch.save`` straight to the storage, hashed as
        it goes), or as a ``RawFile`` (host buffers written as they are, with O_DIRECT
        locally). Returns True when this writer's checkpoint is committed. Returns False (and
        removes this writer's files) when the step is already committed by another writer: an
        earlier run, or a concurrent one (a replacement pod while the old one still runs); the
        second writer is logged and never overwrites the first. A committed but corrupt
        checkpoint at the step is moved out of the way (its manifest kept as
        ``manifest.json.corrupt-<time>``) and written anew. Raises StorageError on failure.
        ``written``: files already in the folder (other ranks' shards), with their size and
        checksum, listed in the manifest too (and removed if another writer wins).
        """
        name = step_dirname(step)
        self._supersede_unevaluated(name, manifest, writer)
        if not self.may_write(name, writer):
            if written and not self._is_ours(name, writer, quiet=True):
                self._remove_files(name, written)
            return self._is_ours(name, writer, quiet=True)
        table = {fname: FileEntry.from_dict(meta) for fname, meta in (written or {}).items()}
        for fname, data in files.items():
            try:
                size, digest = self._put(f"{name}/{fname}", data, create_only=True)
            except FileExistsError:
                # The names carry this writer's token and the step is not committed: the file
                # is this writer's own from a failed earlier attempt at this step. Replace it.
                log.info("replacing %s left by an earlier failed attempt",
                         self.storage.uri(f"{name}/{fname}"))
                size, digest = self._put(f"{name}/{fname}", data)
            table[fname] = FileEntry(size, CHECKSUM, digest)
        self.last_commit_bytes = sum(meta.size for meta in table.values())
        body = dataclasses.replace(manifest, files=table, writer=writer,
                                   created_unix=time.time()).to_json()
        try:
            self.storage.write(f"{name}/{MANIFEST}", body, create_only=True)
        except FileExistsError:
            if self._is_ours(name, writer):
                return True
            self._remove_files(name, [*files, *(written or {})])
            return False
        return True

    def _put(self, rel: str, data: bytes | memoryview | Producer | RawFile,
             create_only: bool = False) -> tuple[int, str]:
        if isinstance(data, RawFile):
            return self.storage.write_parts(rel, data.views(), data.size, create_only)
        if callable(data):
            return self.storage.write_stream(rel, data, create_only)
        return self.storage.write(rel, data, create_only)

    def may_write(self, name: str, writer: str) -> bool:
        """Whether this writer may write step folder ``name``: nothing is committed there, or
        what is committed is corrupt (then moved out of the way). A valid commit by another
        writer is logged."""
        if self.storage.exists(f"{name}/{MANIFEST}") and not self._make_way(name, writer):
            self._is_ours(name, writer)
            return False
        return True

    def _remove_files(self, name: str, files: Any) -> None:
        for fname in files:
            self.storage.remove(f"{name}/{fname}")

    def _is_ours(self, name: str, writer: str, quiet: bool = False) -> bool:
        """Whether the step's committed manifest is this writer's; logs the loser otherwise."""
        try:
            other = self.read_manifest(name).writer
        except CorruptCheckpoint:
            other = "?"
        if other == writer or quiet:
            return other == writer
        log.warning("checkpoint %s is already committed by writer %s; this writer (%s) does not "
                    "overwrite it and discards its own copy", self.storage.uri(name), other, writer)
        return False

    def _supersede_unevaluated(self, name: str, manifest: Manifest, writer: str) -> None:
        """A survivor may have checkpointed an epoch's end before its evaluation (reason
        UNEVALUATED: a peer died in it). The run that resumed from it evaluates the epoch and
        saves the same step again, evaluated: that checkpoint takes the place of the first
        (whose manifest is kept next to it as ``manifest.json.superseded-*``)."""
        if manifest.reason == UNEVALUATED or not self.storage.exists(f"{name}/{MANIFEST}"):
            return
        try:
            old = self.read_manifest(name)
        except CorruptCheckpoint:
            return  # may_write's business
        if old.reason != UNEVALUATED or manifest.epoch <= old.epoch:
            return
        raw = self.storage.read(f"{name}/{MANIFEST}")
        self.storage.write(f"{name}/{MANIFEST}.superseded-{int(time.time())}-{writer}", raw)
        self.storage.remove(f"{name}/{MANIFEST}")
        log.info("checkpoint %s: the evaluated end of epoch %d replaces the survivors' "
                 "checkpoint taken before its evaluation", self.storage.uri(name),
                 manifest.epoch)

    def _make_way(self, name: str, writer: str) -> bool:
        """A manifest exists at this step. If its checkpoint is corrupt, un-commit it (keeping
        the bad manifest for inspection) and return True: the step may be written again."""
        try:
            self.read_verified(name)
            return False
        except CorruptCheckpoint as e:
            reason = e
        if "format version" in str(reason):
            return False  # another build's valid checkpoint: not ours to un-commit
        raw = b""
        try:
            raw = self.storage.read(f"{name}/{MANIFEST}")
        except FileNotFoundError:
            pass
        if raw:
            self.storage.write(f"{name}/{MANIFEST}.corrupt-{int(time.time())}-{writer}", raw)
        log.warning("checkpoint %s is committed but invalid (%s); writing it again (the bad "
                    "manifest is kept next to it as %s.corrupt-*)", self.storage.uri(name),
                    reason, MANIFEST)
        self.storage.remove(f"{name}/{MANIFEST}")
        return True

    # ------------------------------------------------------------------ retention
    def probe_writable(self) -> None:
        """Write and delete a small file at the root, so that an unwritable --checkpoint-dir
        is reported before training (PermissionError, NotADirectoryError, ...), not as failed
        saves after the first interval."""
        probe = f".write-probe-{uuid.uuid4().hex[:12]}"
        self.storage.write(probe, b"probe\n")
        self.storage.remove(probe)

    def retain(self, keep_last: int, grace_s: float, now: float | None = None,
               newest: int | None = None, best: Any = None) -> list[str]:
        """Delete checkpoints beyond the newest ``keep_last`` (and the ``best`` ones) and old
        leftovers of crashed writers (retention.py); returns what it deleted."""
        from .retention import retain

        return retain(self, keep_last, grace_s, now, newest, best)


def open_uri(uri: str, options: dict[str, Any] | None = None) -> tuple[CheckpointStore, str | None]:
    """A URI is either a checkpoint root (returns name None) or one checkpoint folder."""
    uri = uri.rstrip("/")
    head, _, tail = uri.rpartition("/")
    if STEP_DIR.match(tail) and head:
        return CheckpointStore(Storage(head, options)), tail
    return CheckpointStore(Storage(uri, options)), None


def load_uri(uri: str, options: dict[str, Any] | None = None) -> Loaded:
    """The checkpoint a URI names, the newest valid one below a root, or, for ``ROOT/best``,
    the best one by the run's --best-metric (unless ROOT/best is itself a root).

    Raises CorruptCheckpoint (one invalid checkpoint) or FileNotFoundError (no valid one).
    """
    head, _, tail = uri.rstrip("/").rpartition("/")
    if tail == BEST and head and not CheckpointStore(Storage(uri, options)).step_dirs():
        loaded = CheckpointStore(Storage(head, options)).best()
        if loaded is None:
            raise FileNotFoundError(f"no valid checkpoint under {head}")
        return loaded
    store, name = open_uri(uri, options)
    if name is not None:
        return store.load(name)
    loaded = store.latest()
    if loaded is None:
        raise FileNotFoundError(f"no valid checkpoint under {uri}")
    return loaded
