"""Checkpoint policy: layout, commit protocol, verification, latest, retention, snapshot/persist.

Layout below the checkpoint root (local folder or s3://bucket/prefix)::

    step_0000000480/
        state-<writer>.pt          model, optimizer, scheduler (torch.save; loaded weights_only)
        train_state-<writer>.json  epoch, step, position in epoch, metric history, seeds, config
        manifest.json              written last, create-only: its presence is the commit

Data files carry the writer's token in their names, so two writers of the same step never touch
each other's files and the create-only manifest decides which one committed. A checkpoint is
valid when its manifest parses and every file it lists has the recorded size and checksum
(format 2: XXH3-128, the algorithm named per file; format 1 checkpoints carry SHA-256 and still
verify and load).

A sharded checkpoint (``--parallel fsdp``, format 3, ``layout: "sharded"``) holds the model and
optimizer as DCP shard files, one per rank that wrote it (sharded.py), next to rank 0's files::

    step_0000000480/
        shard-<rank>-<writer>.distcp   this rank's chunks of the model and optimizer state
        dcp-<writer>.json              DCP's metadata (global shapes, chunks, where they are)
        state-<writer>.pt              schedule, gradient scaler, RNG states, the task's state
        train_state-<writer>.json
        manifest.json                  lists every file above, written last by rank 0

Every rank writes its own shard; rank 0 receives every rank's file table (name, size,
checksum), writes its own files and publishes the manifest create-only after all finished.
A missing or corrupt shard makes the whole checkpoint invalid. Format 2 readers refuse
format 3 ("format version 3") rather than misread it.
"""

from __future__ import annotations

import io
import json
import logging
import os
import platform
import re
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import torch

from ..runtime.memory import PeakRss
from ..storage import CHECKSUM, CHECKSUM_NAMES, Storage, StorageError, checksum, redact

log = logging.getLogger(__name__)

# Writes one file's bytes into the binary file object it is given.
Producer = Callable[[BinaryIO], object]

FORMAT_VERSION = 2  # 2: per-file checksum algorithm (XXH3-128); 1: SHA-256
SHARDED_FORMAT = 3  # 3: layout "sharded" (DCP shard files, one per rank that wrote it)
READABLE_FORMATS = (1, 2, 3)
SHARDED = "sharded"
MANIFEST = "manifest.json"
STEP_DIR = re.compile(r"^step_(\d{10})$")


def step_dirname(step: int) -> str:
    return f"step_{step:010d}"


def library_versions() -> dict[str, str]:
    import fsspec

    v = {"torch": torch.__version__, "python": platform.python_version(),
         "fsspec": fsspec.__version__}
    try:
        import torchvision

        v["torchvision"] = torchvision.__version__
    except ImportError:
        pass
    return v


def _inside_folder(fname: object) -> bool:
    """Whether a manifest's file name stays inside its checkpoint folder: a relative path of
    plain parts ("state-ab.pt", "shards/rank1.pt"), without "..", ".", empty parts, backslashes
    or a leading "/"."""
    if not isinstance(fname, str) or not fname or "\\" in fname or "\0" in fname:
        return False
    return all(part not in ("", ".", "..") for part in fname.split("/"))


class CorruptCheckpoint(Exception):
    """A checkpoint that is not committed, or whose files do not match its manifest."""


def verify_checksum(fname: str, meta: dict[str, Any], data: bytes | memoryview) -> None:
    """Raise CorruptCheckpoint unless ``data`` has the checksum the manifest entry records
    (``algorithm`` + ``digest``; format 1 entries: ``sha256``)."""
    algorithm = "sha256" if "sha256" in meta else str(meta.get("algorithm"))
    expected = meta.get("sha256") if algorithm == "sha256" else meta.get("digest")
    try:
        actual = checksum(data, algorithm)
    except ValueError as e:
        raise CorruptCheckpoint(f"{fname}: {e}") from None
    if actual != expected:
        raise CorruptCheckpoint(f"{fname} fails its {CHECKSUM_NAMES[algorithm]} check "
                                "(corrupted bytes)")


class SaveTimeout(Exception):
    """A save did not finish in the time it was given; it goes on in the background."""


@dataclass
class Loaded:
    name: str
    uri: str
    manifest: dict[str, Any]
    # model / optimizer / scheduler state dicts (CPU tensors); a sharded checkpoint's holds no
    # model and optimizer: they are in its shards (``dcp``).
    state: dict[str, Any]
    train_state: dict[str, Any]
    dcp: Any = None  # sharded: DCP's Metadata (the shard files' index)
    storage: Storage | None = None  # sharded: the storage its folder ``name`` is in
    # sharded, remote storage: shard files this process has downloaded and verified already,
    # by name; the load takes them from here instead of downloading them again.
    verified: dict[str, Any] = field(default_factory=dict)

    @property
    def sharded(self) -> bool:
        return self.manifest.get("layout") == SHARDED

    def model_state(self) -> dict[str, Any]:
        """The model's whole state dict (CPU tensors), whatever the layout: a sharded
        checkpoint's chunks are assembled in this process (no model, no process group)."""
        if not self.sharded:
            return self.state["model"]
        from .dcp import read_full_tensors

        return read_full_tensors(self.storage, self.name, self.dcp, "model.")


@dataclass
class Entry:
    """One folder below the root as ``ckpt ls`` reports it."""

    name: str
    uri: str
    step: int
    valid: bool
    reason: str = ""
    manifest: dict[str, Any] | None = None
    size: int = 0
    created: float | None = None


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

    def read_manifest(self, name: str) -> dict[str, Any]:
        """Raises CorruptCheckpoint when absent or malformed."""
        try:
            raw = self.storage.read(f"{name}/{MANIFEST}")
        except FileNotFoundError:
            raise CorruptCheckpoint("no manifest (never committed, or a crashed writer)") from None
        if not raw:
            raise CorruptCheckpoint(f"{MANIFEST} is empty (0 bytes: damaged after its commit, "
                                    "or lost in a crash of an unsynced filesystem)")
        try:
            manifest = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CorruptCheckpoint(f"{MANIFEST} is not valid JSON ({e})") from None
        if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
            raise CorruptCheckpoint("manifest has no 'files' table")
        for fname, meta in manifest["files"].items():
            # Every file lives inside the checkpoint's own folder: a name that climbs out of it
            # would read (and trust) another checkpoint's or any other file.
            if not _inside_folder(fname):
                raise CorruptCheckpoint(f"{MANIFEST} names {fname!r}, a path outside its "
                                        "checkpoint folder; nothing of this checkpoint is read")
            if not isinstance(meta, dict) or not isinstance(meta.get("size"), int):
                raise CorruptCheckpoint(f"{MANIFEST}: the entry of {fname!r} has no size")
        if manifest.get("format_version") not in READABLE_FORMATS:
            raise CorruptCheckpoint(f"format version {manifest.get('format_version')!r}, this "
                                    f"build reads {', '.join(map(str, READABLE_FORMATS))}")
        keys = ["step", "epoch", "state_file", "train_state_file"]
        if manifest.get("layout") == SHARDED:
            keys += ["dcp_metadata_file", "shards"]
        for key in keys:
            if key not in manifest:
                raise CorruptCheckpoint(f"manifest lacks {key!r}")
        if manifest.get("layout") == SHARDED and (
                not isinstance(manifest["shards"], list)
                or not set(manifest["shards"]) <= set(manifest["files"])):
            raise CorruptCheckpoint("manifest's shards are not among its files")
        return manifest

    def read_verified(self, name: str, manifest: dict[str, Any] | None = None,
                      shards: str = "full") -> tuple[dict[str, Any], dict[str, Any]]:
        """Manifest and the bytes of every file it lists, each checked for size and checksum.

        A sharded checkpoint's shard files: with ``shards="full"`` checked like the others
        (not returned); with ``"size"`` only their sizes are (the ranks share the checksums:
        ``verify_files``)."""
        manifest = self.read_manifest(name) if manifest is None else manifest
        shard_files = set(manifest.get("shards") or ()) if manifest.get("layout") == SHARDED \
            else set()
        blobs: dict[str, bytes] = {}
        for fname, meta in manifest["files"].items():
            if fname in shard_files:
                if shards == "size":
                    self._check_size(name, fname, meta)
                else:
                    self.verify_files(name, manifest, [fname], raise_=True)
                continue
            blobs[fname] = self._read_checked(name, fname, meta)
        return manifest, blobs

    def _read_checked(self, name: str, fname: str, meta: dict[str, Any]) -> Any:
        try:
            data = self.storage.read_mapped(f"{name}/{fname}")
        except FileNotFoundError:
            raise CorruptCheckpoint(f"{fname} is missing") from None
        if len(data) != meta.get("size"):
            raise CorruptCheckpoint(f"{fname} has {len(data)} bytes, manifest says "
                                    f"{meta.get('size')} (truncated?)")
        verify_checksum(fname, meta, data)
        return data

    def _check_size(self, name: str, fname: str, meta: dict[str, Any]) -> None:
        try:
            size = int(self.storage.info(f"{name}/{fname}").get("size") or 0)
        except FileNotFoundError:
            raise CorruptCheckpoint(f"{fname} is missing") from None
        if size != meta.get("size"):
            raise CorruptCheckpoint(f"{fname} has {size} bytes, manifest says "
                                    f"{meta.get('size')} (truncated?)")

    def verify_files(self, name: str, manifest: dict[str, Any], files: list[str],
                     raise_: bool = False, keep: dict[str, Any] | None = None) -> str | None:
        """Check ``files`` of checkpoint ``name`` (one at a time) against the manifest. Returns
        the first problem (naming the file), None when all match; with ``raise_`` raises it as
        CorruptCheckpoint. ``keep``: on remote storage, the verified bytes go there by file
        name (a local file is mapped: reading it again costs no download)."""
        for fname in files:
            try:
                data = self._read_checked(name, fname, manifest["files"][fname])
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

    def _deserialize(self, name: str, manifest: dict[str, Any], blobs: dict[str, Any]) -> Loaded:
        try:
            blob = blobs[manifest["state_file"]]
            path = self.storage.local_path(f"{name}/{manifest['state_file']}")
            if path is not None and len(blob):
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
            train_state = json.loads(bytes(blobs[manifest["train_state_file"]]))
        except (KeyError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CorruptCheckpoint(f"train state unreadable: {e}") from None
        if manifest.get("layout") == SHARDED:
            from .dcp import decode_metadata

            if not isinstance(state, dict):
                raise CorruptCheckpoint("state file holds no state")
            try:
                dcp = decode_metadata(blobs[manifest["dcp_metadata_file"]])
            except (KeyError, ValueError) as e:
                raise CorruptCheckpoint(f"DCP metadata unreadable: {e}") from None
            missing = {loc.file for loc in dcp.storage_data.values()} - set(manifest["shards"])
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

    def entries(self) -> list[Entry]:
        """Every step folder with its validity (reads and hashes every file once)."""
        out = []
        for step, name in self.step_dirs():
            entry = Entry(name, self.storage.uri(name), step, False)
            try:
                # What the manifest says is shown even when the files do not match it.
                entry.manifest = manifest = self.read_manifest(name)
                entry.created = manifest.get("created_unix")
                entry.size = sum(int(m.get("size") or 0) for m in manifest["files"].values()
                                 if isinstance(m, dict))
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
    def commit(self, step: int, files: dict[str, bytes | memoryview | Producer],
               manifest: dict[str, Any], writer: str,
               written: dict[str, dict[str, Any]] | None = None) -> bool:
        """Write ``files`` into the step's folder, then the manifest, create-only.

        A file is given as its bytes, or as a ``Producer``: a function that writes the file's
        bytes into the file object it is given (``torch.save`` straight to the storage, hashed as
        it goes). Returns True when this writer's checkpoint is committed. Returns False (and
        removes this writer's files) when the step is already committed by another writer: an
        earlier run, or a concurrent one (a replacement pod while the old one still runs); the
        second writer is logged and never overwrites the first. A committed but corrupt
        checkpoint at the step is moved out of the way (its manifest kept as
        ``manifest.json.corrupt-<time>``) and written anew. Raises StorageError on failure.
        ``written``: files already in the folder (other ranks' shards), with their size and
        checksum, listed in the manifest too (and removed if another writer wins).
        """
        name = step_dirname(step)
        if not self.may_write(name, writer):
            if written and not self._is_ours(name, writer, quiet=True):
                self._remove_files(name, written)
            return self._is_ours(name, writer, quiet=True)
        table = dict(written or {})
        for fname, data in files.items():
            put = self.storage.write_stream if callable(data) else self.storage.write
            try:
                size, digest = put(f"{name}/{fname}", data, create_only=True)
            except FileExistsError:
                # The names carry this writer's token and the step is not committed: the file
                # is this writer's own from a failed earlier attempt at this step. Replace it.
                log.info("replacing %s left by an earlier failed attempt",
                         self.storage.uri(f"{name}/{fname}"))
                size, digest = put(f"{name}/{fname}", data)
            table[fname] = {"size": size, "algorithm": CHECKSUM, "digest": digest}
        self.last_commit_bytes = sum(meta["size"] for meta in table.values())
        # Test-only (launch/chaos.py, tests/test_exact_resume.py): hold the checkpoint
        # half-written for this many seconds so that a kill lands inside the save.
        time.sleep(float(os.environ.get("FTT_TEST_PAUSE_IN_SAVE") or 0))
        manifest = dict(manifest, files=table, writer=writer, created_unix=time.time())
        body = json.dumps(manifest, indent=1, sort_keys=True).encode()
        try:
            self.storage.write(f"{name}/{MANIFEST}", body, create_only=True)
        except FileExistsError:
            if self._is_ours(name, writer):
                return True
            self._remove_files(name, [*files, *(written or {})])
            return False
        return True

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
            other = self.read_manifest(name).get("writer")
        except CorruptCheckpoint:
            other = "?"
        if other == writer or quiet:
            return other == writer
        log.warning("checkpoint %s is already committed by writer %s; this writer (%s) does not "
                    "overwrite it and discards its own copy", self.storage.uri(name), other, writer)
        return False

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
               newest: int | None = None) -> list[str]:
        """Delete committed checkpoints beyond the newest ``keep_last`` (manifest first, so a
        half-deleted one never looks committed), and leftovers of crashed writers older than
        ``grace_s``. Returns what it deleted.

        Only checkpoints whose manifest parses count towards ``keep_last``, so a damaged
        manifest never pushes the last good checkpoints out. ``newest``: the step just
        committed; committed folders of later steps (corrupt ones a resume skipped, or another
        run's) are neither counted nor deleted, so they never push this run's checkpoints out. On S3 a "folder" is a key prefix
        without a time of its own: a leftover's age is that of its newest object.
        """
        keep_last = max(2, keep_last)
        now = time.time() if now is None else now
        deleted = []
        kept = 0
        for step, name in self.step_dirs():
            files = self.storage.listdir(name)
            if MANIFEST in files and newest is not None and step > newest:
                continue
            if MANIFEST not in files:
                if self._age(name, files, now) > grace_s:
                    log.info("removing %s: no manifest and untouched for over %.0fs (crashed "
                             "writer)", self.storage.uri(name), grace_s)
                    self.storage.remove_tree(name)
                    deleted.append(name)
                continue
            if kept >= keep_last:
                log.info("retention: deleting %s (keeping the newest %d)", self.storage.uri(name),
                         keep_last)
                self.storage.remove(f"{name}/{MANIFEST}")
                self.storage.remove_tree(name)
                deleted.append(name)
                continue
            try:
                listed = set(self.read_manifest(name)["files"])
            except CorruptCheckpoint:
                continue  # does not count; deleted once keep_last good ones are newer
            kept += 1
            self._remove_strays(name, files, listed, grace_s, now)
        return deleted

    def _age(self, name: str, files: list[str], now: float) -> float:
        times = [t for f in files if (t := self.storage.modified(f"{name}/{f}")) is not None]
        if not times:
            t = self.storage.modified(name) if self.storage.is_local else None
            return now - t if t is not None else float("inf")
        return now - max(times)

    def _remove_strays(self, name: str, files: list[str], listed: set[str], grace_s: float,
                       now: float) -> None:
        """Files in a committed folder that its manifest does not list (a losing writer's, an
        earlier failed attempt's, a quarantined manifest), once older than the grace period."""
        for f in files:
            if f not in listed and f != MANIFEST and self._age(name, [f], now) > grace_s:
                log.info("removing stray %s", self.storage.uri(f"{name}/{f}"))
                self.storage.remove(f"{name}/{f}")


def open_uri(uri: str, options: dict[str, Any] | None = None) -> tuple[CheckpointStore, str | None]:
    """A URI is either a checkpoint root (returns name None) or one checkpoint folder."""
    uri = uri.rstrip("/")
    head, _, tail = uri.rpartition("/")
    if STEP_DIR.match(tail) and head:
        return CheckpointStore(Storage(head, options)), tail
    return CheckpointStore(Storage(uri, options)), None


def load_uri(uri: str, options: dict[str, Any] | None = None) -> Loaded:
    """The checkpoint a URI names, or the newest valid one below a root.

    Raises CorruptCheckpoint (one invalid checkpoint) or FileNotFoundError (no valid one).
    """
    store, name = open_uri(uri, options)
    if name is not None:
        return store.load(name)
    loaded = store.latest()
    if loaded is None:
        raise FileNotFoundError(f"no valid checkpoint under {uri}")
    return loaded


# ---------------------------------------------------------------------------- snapshot/persist
class _Snapshot:
    """Preallocated host buffers the state is copied into (pinned when it lives on a GPU), so
    the loop is blocked only for a memcpy; the buffers are reused from save to save."""

    def __init__(self) -> None:
        self.buffers: dict[str, torch.Tensor] = {}

    def copy(self, obj: Any, key: str = "") -> Any:
        if _is_dtensor(obj):
            return self._copy_dtensor(obj, key)
        if isinstance(obj, torch.Tensor):
            buf = self.buffers.get(key)
            if buf is None or buf.shape != obj.shape or buf.dtype != obj.dtype:
                pin = obj.device.type == "cuda"
                buf = torch.empty(obj.shape, dtype=obj.dtype, device="cpu", pin_memory=pin)
                self.buffers[key] = buf
            buf.copy_(obj.detach(), non_blocking=True)
            return buf
        if isinstance(obj, dict):
            return {k: self.copy(v, f"{key}/{k}") for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return type(obj)(self.copy(v, f"{key}/{i}") for i, v in enumerate(obj))
        return obj

    def _copy_dtensor(self, obj: Any, key: str) -> Any:
        """This rank's shard of a DTensor into a host buffer, kept as a DTensor with the same
        mesh and placements, so that DCP knows where the shard sits in the whole tensor."""
        local = obj.to_local()
        shell = self.buffers.get(key)
        if shell is None or shell.shape != obj.shape or shell.dtype != obj.dtype or \
                shell.placements != obj.placements or shell.to_local().shape != local.shape:
            # The first snapshot allocates: a CPU copy of the DTensor (same mesh, placements,
            # global shape), whose local tensor is the buffer from then on.
            shell = obj.detach().to("cpu", copy=True)
            if local.device.type == "cuda":
                # Private: DTensor has no public way to swap its local tensor for a pinned one
                # (from_local moves it back to the mesh's device); torch's own staging for
                # async_save does the same (torch/distributed/_state_dict_utils.py).
                shell._local_tensor = shell._local_tensor.pin_memory()
            self.buffers[key] = shell
        shell.to_local().copy_(local.detach(), non_blocking=True)
        return shell


def _is_dtensor(obj: Any) -> bool:
    # Never imported here (0.6 s on the first save): a DTensor exists only once it is. (It may
    # be half-imported by another thread, before DTensor is defined: then none exists yet.)
    cls = getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", None)
    return cls is not None and isinstance(obj, cls)


@dataclass
class SaveRequest:
    step: int
    state: dict[str, Any]  # tensors already snapshotted into buffer set ``buffers``
    train_state: dict[str, Any]
    manifest: dict[str, Any]
    buffers: int  # which of the two host buffer sets holds the tensors
    serial: int  # order of the requests
    started: float = field(default_factory=time.monotonic)


def warn_saves_outpace_storage(persist_s: float, interval_s: float, what: str) -> None:
    """The one warning (per run and kind) that saves come due faster than storage takes them;
    ``what`` says what happens to the save at hand (dropped for a newer snapshot, or skipped)."""
    log.warning("checkpoint saves come due faster than storage takes them: the last persist "
                "took %.2fs, saves come every %.2fs; %s (the newest state always waits its turn, "
                "so a crash loses at most one save interval plus two persists). Raise "
                "--save-every-steps or --save-every-seconds; such saves are counted in the "
                "history (saves_dropped)", persist_s, interval_s, what)


class Checkpointer:
    """Rank 0's saver. The caller only snapshots: it copies the state into one of two sets of
    reused host buffers (pinned when the state is on a GPU). A persister thread serializes,
    writes and commits, then applies retention.

    One save persists while at most one newer snapshot waits. A save that comes due while one
    persists never makes the loop wait: its snapshot waits its turn, and a still newer save
    replaces it (the superseded snapshot is dropped and counted; the persister always takes the
    newest state). Only blocking saves (final, preemption, exit) wait for their own commit.
    So the work a SIGKILL can lose is bounded: the newest committed snapshot was at most one
    save interval old when its persist started, it waited at most one persist, and the next
    commit comes at most one persist later; below one interval plus two saves (snapshot to
    commit), one interval plus one save when storage keeps up. Consecutive failures are counted
    for the caller.
    """

    def __init__(self, store: CheckpointStore, keep_last: int, orphan_grace_s: float) -> None:
        self.store = store
        self.keep_last = keep_last
        self.orphan_grace_s = orphan_grace_s
        self.is_main = True  # logs commits and applies retention
        self.writer = uuid.uuid4().hex[:12]
        self._sets = (_Snapshot(), _Snapshot())
        self._cond = threading.Condition()
        self._pending: SaveRequest | None = None  # snapshotted, waiting for the persister
        self._running: SaveRequest | None = None  # being persisted
        self._results: dict[int, bool] = {}  # serial -> committed (finished requests)
        self._serial = 0
        self._closed = False
        self._thread = threading.Thread(target=self._work, name="ckpt-persist", daemon=True)
        self.consecutive_failures = 0
        self.last_committed_step: int | None = None
        self.last_stall_s = 0.0
        self.last_persist_s = 0.0  # duration of the newest finished persist
        self.dropped = 0  # snapshots superseded before their persist started
        self.committed = 0  # saves committed by this process
        self.failed = 0  # saves that failed (after the storage retries)
        self.last_commit_time: float | None = None  # wall clock of the newest commit
        self._drop_logged = False
        self._last_request: float | None = None  # monotonic time of the previous save request
        self._running_since = 0.0  # monotonic time the running persist was taken
        self.request_interval_s = 0.0  # time between the two newest save requests
        # At DEBUG: each save's peak RSS, snapshot to commit (memory.py), keyed by serial.
        self.memory = PeakRss(log.isEnabledFor(logging.DEBUG))
        self._thread.start()

    def save(self, step: int, state: dict[str, Any], train_state: dict[str, Any],
             manifest: dict[str, Any], blocking: bool = False,
             timeout: float | None = None) -> bool | None:
        """Snapshot now, persist in the background. With ``blocking`` wait for this save's
        commit and return whether it committed (or was already committed); otherwise return
        None at once. ``timeout`` bounds a blocking save's wait: SaveTimeout past it (the save
        stays in flight)."""
        t0 = time.perf_counter()
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            if self._closed:
                raise RuntimeError("Checkpointer.save() after close()")
            now = time.monotonic()
            if self._last_request is not None:
                self.request_interval_s = now - self._last_request
            self._last_request = now
            # The set the running persist reads from is off limits; the waiting snapshot has
            # not started, so its set is free to overwrite.
            free = 1 - self._running.buffers if self._running is not None else 0
            if self._pending is not None:
                self._drop(self._pending)
            self.memory.start(self._serial + 1)
            snap = self._sets[free].copy(state)
            if torch.cuda.is_available() and torch.cuda.is_initialized():
                torch.cuda.synchronize()
            self._serial += 1
            req = SaveRequest(step, snap, json.loads(json.dumps(train_state)), dict(manifest),
                              free, self._serial)
            self._pending = req
            self._cond.notify_all()
        self.last_stall_s = time.perf_counter() - t0
        log.debug("snapshot of step %d: %.1f ms", step, self.last_stall_s * 1e3)
        if blocking:
            return self._wait_for(req, deadline)
        return None

    def persist_left_s(self) -> float:
        """Estimated seconds until the persist in flight ends: the newest finished persist's
        length minus the time this one has run; 0 when none runs or none has finished yet."""
        with self._cond:
            if self._running is None or not self.last_persist_s:
                return 0.0
            return max(0.0, self.last_persist_s - (time.monotonic() - self._running_since))

    def _drop(self, old: SaveRequest) -> None:
        """Called with the lock held: ``old`` is superseded before its persist started."""
        self.dropped += 1
        self._results[old.serial] = False
        self.memory.stop(old.serial)
        if not self._drop_logged:
            self._drop_logged = True
            warn_saves_outpace_storage(self.last_persist_s, self.request_interval_s,
                                       f"the snapshot of step {old.step} is dropped for a "
                                       "newer one")

    def _wait_for(self, req: SaveRequest, deadline: float | None) -> bool:
        with self._cond:
            while req.serial not in self._results:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise SaveTimeout(f"the save of step {req.step} is still in flight after "
                                      f"the time it was given")
                self._cond.wait(left)
            return self._results[req.serial]

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until nothing is waiting or persisting; True when the newest save committed
        (or there was none). Raises SaveTimeout after ``timeout`` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._pending is not None or self._running is not None:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise SaveTimeout(f"a save is still in flight after {timeout:.1f}s")
                self._cond.wait(left)
            return self._results.get(self._serial, True)

    def _work(self) -> None:
        while True:
            with self._cond:
                while self._pending is None and not self._closed:
                    self._cond.wait()
                if self._pending is None:
                    return
                req, self._pending = self._pending, None
                self._running = req
                self._running_since = time.monotonic()
            t0 = time.monotonic()
            try:
                agreed = self._agree(req)
            except Exception as e:  # noqa: BLE001 - a peer is gone: this save fails
                req = self._running or req
                self.memory.stop(req.serial)
                self._failed(step_dirname(req.step), e)
                ok = False
            else:
                if agreed is None:
                    return
                req = agreed
                t0 = time.monotonic()
                ok = self._persist(req)
            with self._cond:
                self.last_persist_s = time.monotonic() - t0
                self._results[req.serial] = ok
                for serial in [k for k in self._results if k < req.serial - 64]:
                    del self._results[serial]  # nobody waits for those any more
                self._running = None
                self._cond.notify_all()

    def _agree(self, req: SaveRequest) -> SaveRequest | None:
        """The request to persist now (``req``: the one just taken; running). One writer has
        nobody to agree with."""
        return req

    def _write(self, req: SaveRequest) -> bool:
        """Write and commit one checkpoint; whether this writer committed it."""
        state_file = f"state-{self.writer}.pt"
        train_file = f"train_state-{self.writer}.json"
        # torch.save writes straight into the storage's file, hashed as it goes: no copy of
        # the whole state in memory and no second pass over it to hash it.
        files = {state_file: lambda fh: torch.save(req.state, fh),
                 train_file: json.dumps(req.train_state, sort_keys=True).encode()}
        manifest = dict(req.manifest, format_version=FORMAT_VERSION, step=req.step,
                        state_file=state_file, train_state_file=train_file,
                        versions=library_versions())
        return self.store.commit(req.step, files, manifest, self.writer)

    def _persist(self, req: SaveRequest) -> bool:
        name = step_dirname(req.step)
        try:
            committed = self._write(req)
            secs = time.monotonic() - req.started
            self.memory.log(req.serial, f"save of step {req.step}", log)
            if committed and self.is_main:
                log.info("checkpoint %s committed (%.1f MiB, %.2fs)", self.store.storage.uri(name),
                         self.store.last_commit_bytes / 2**20, secs)
            self.consecutive_failures = 0
            self.last_committed_step = req.step
            self.committed += 1
            self.last_commit_time = time.time()
            if self.is_main:
                try:
                    self.store.retain(self.keep_last, self.orphan_grace_s, newest=req.step)
                except (StorageError, OSError) as e:
                    log.warning("retention after %s failed (will retry next save): %s", name, e)
            return True
        except Exception as e:  # noqa: BLE001 - a failed save must not kill training
            self.memory.stop(req.serial)
            self._failed(name, e)
            return False

    def _failed(self, name: str, e: BaseException) -> None:
        self.consecutive_failures += 1
        self.failed += 1
        log.error("SAVE FAILED for %s (%d in a row): %s: %s", self.store.storage.uri(name),
                  self.consecutive_failures, type(e).__name__, redact(str(e))[:2000])

    def close(self) -> None:
        """Persist what is waiting, then stop the persister thread."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join()


class ShardedCheckpointer(Checkpointer):
    """Every rank's saver under ``--parallel fsdp``: the same snapshot and background persist
    as ``Checkpointer``, but each rank writes its own shard (DCP, through ``sharded.ShardWriter``)
    and rank 0 commits the whole checkpoint once all shards are written.

    The persisters of all ranks persist the same saves, agreed on over ``group`` (a gloo group
    of their own, so that the background collectives never mix with training's): each takes
    the newest snapshot it has, and they compare serials; a rank holding an older one than
    another's drops it and waits for that newer one (its loop makes the same saves, so it
    comes). The first rank to persist a serial therefore never waits for a rank that dropped
    it, and a blocking save is persisted by all.
    """

    def __init__(self, store: CheckpointStore, keep_last: int, orphan_grace_s: float,
                 group: Any, is_main: bool, world_size: int) -> None:
        # Imported here, not first in the persister thread while the loop snapshots.
        import torch.distributed.checkpoint  # noqa: F401

        from . import dcp  # noqa: F401

        self.group = group  # None: one process, nobody to agree with
        self.world_size = world_size
        super().__init__(store, keep_last, orphan_grace_s)
        self.is_main = is_main

    def _agree(self, req: SaveRequest) -> SaveRequest | None:
        if self.group is None:
            return req
        import torch.distributed as dist

        while True:
            bounds = torch.tensor([req.serial, -req.serial], dtype=torch.int64)
            dist.all_reduce(bounds, op=dist.ReduceOp.MAX, group=self.group)
            newest, oldest = int(bounds[0]), -int(bounds[1])
            if newest == oldest:
                return req
            if req.serial == newest:
                continue  # the others catch up with this one
            with self._cond:
                self._drop(req)
                self._running = None
                self._cond.notify_all()
                while (self._pending is None or self._pending.serial < newest) and \
                        not self._closed:
                    self._cond.wait()
                if self._pending is None:
                    log.error("closed while the other ranks persist save %d; leaving", newest)
                    return None
                req, self._pending = self._pending, None
                self._running = req

    def _write(self, req: SaveRequest) -> bool:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint import CheckpointException, DefaultSavePlanner

        from .dcp import ShardedCheckpointError, ShardWriter, describe_failure, first_failure

        name = step_dirname(req.step)
        committed = [False]

        def commit(metadata: bytes, shards: dict[str, dict[str, Any]]) -> None:
            state_file = f"state-{self.writer}.pt"
            train_file = f"train_state-{self.writer}.json"
            meta_file = f"dcp-{self.writer}.json"
            small = req.state.get("small") or {}
            files = {state_file: lambda fh: torch.save(small, fh),
                     train_file: json.dumps(req.train_state, sort_keys=True).encode(),
                     meta_file: metadata}
            manifest = dict(req.manifest, format_version=SHARDED_FORMAT, layout=SHARDED,
                            step=req.step, state_file=state_file, train_state_file=train_file,
                            dcp_metadata_file=meta_file, shards=sorted(shards),
                            shard_world_size=self.world_size, versions=library_versions())
            committed[0] = self.store.commit(req.step, files, manifest, self.writer, shards)

        def precheck() -> bool:
            return self.store.may_write(name, self.writer)

        writer = ShardWriter(self.store.storage, name, self.writer,
                             precheck if self.is_main else None,
                             commit if self.is_main else None)
        try:
            # Replicated values (BatchNorm buffers, the optimizer's step counts and
            # hyperparameters) are written once, by the lowest rank that holds them: rank 0's,
            # as under DDP.
            dcp.save(req.state["sharded"], storage_writer=writer, process_group=self.group,
                     planner=DefaultSavePlanner(dedup_save_to_lowest_rank=True))
        except CheckpointException as e:  # a BaseException: would end the persister thread
            cause = first_failure(e)
            raise ShardedCheckpointError(describe_failure("the sharded save", e)) from (
                cause if isinstance(cause, Exception) else None)
        return committed[0] if self.is_main else True
