"""The checkpoint format: layout, names, versions, what makes a checkpoint valid.

Layout below the checkpoint root (local folder or s3://bucket/prefix)::

    step_0000000480/
        state-<writer>.bin         model, optimizer, scheduler: the tensors' raw bytes behind a
                                   header (rawstate.py; format 4), or torch.save's zip in
                                   state-<writer>.pt (formats 1 and 2, and a state holding a
                                   tensor the raw layout cannot carry); loaded weights_only
        train_state-<writer>.json  epoch, step, position in epoch, metric history, seeds, config
        manifest.json              written last, create-only: its presence is the commit

Data files carry the writer's token in their names, so two writers of the same step never touch
each other's files and the create-only manifest decides which one committed. A checkpoint is
valid when its manifest parses and every file it lists has the recorded size and checksum
(format 2 and later: XXH3-128, the algorithm named per file; format 1 checkpoints carry SHA-256
and still verify and load).

A sharded checkpoint (``--parallel fsdp``, format 3, ``layout: "sharded"``) holds the model and
optimizer as DCP shard files, one per rank that wrote it (dcp.py), next to rank 0's files::

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

import dataclasses
import functools
import importlib.metadata
import json
import platform
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import torch

from ..storage import CHECKSUM_NAMES, Storage, checksum

# Writes one file's bytes into the binary file object it is given.
Producer = Callable[[BinaryIO], object]

FORMAT_VERSION = 4  # 4: the state file's tensors as raw bytes (rawstate.py)
ZIP_FORMAT = 2  # 2: the state file from torch.save, checksum named per file (XXH3-128)
SHARDED_FORMAT = 3  # 3: layout "sharded" (DCP shard files, one per rank that wrote it)
READABLE_FORMATS = (1, 2, 3, 4)  # 1: torch.save, SHA-256
SHARDED = "sharded"
MANIFEST = "manifest.json"
STEP_DIR = re.compile(r"^step_(\d{10})$")


def step_dirname(step: int) -> str:
    return f"step_{step:010d}"


def library_versions() -> dict[str, str]:
    """The versions a manifest records (for ``ckpt inspect``)."""
    return dict(_library_versions())


@functools.cache
def _library_versions() -> dict[str, str]:
    # Never imports torchvision: importing it took 0.19 s in the persister thread's first
    # save, holding the GIL while the loop trained (the epoch after the first save ran at 60%
    # of the others' speed). Its installed version is read from the package metadata instead
    # (without the local "+cu130" label that its __version__ carries when it is imported).
    import fsspec

    v = {"torch": torch.__version__, "python": platform.python_version(),
         "fsspec": fsspec.__version__}
    loaded = sys.modules.get("torchvision")
    if loaded is not None:
        v["torchvision"] = loaded.__version__
    else:
        try:
            v["torchvision"] = importlib.metadata.version("torchvision")
        except importlib.metadata.PackageNotFoundError:
            pass
    return v


def inside_folder(fname: object) -> bool:
    """Whether a manifest's file name stays inside its checkpoint folder: a relative path of
    plain parts ("state-ab.pt", "shards/rank1.pt"), without "..", ".", empty parts, backslashes
    or a leading "/"."""
    if not isinstance(fname, str) or not fname or "\\" in fname or "\0" in fname:
        return False
    return all(part not in ("", ".", "..") for part in fname.split("/"))


class CorruptCheckpoint(Exception):
    """A checkpoint that is not committed, or whose files do not match its manifest."""


@dataclass(frozen=True)
class FileEntry:
    """One file of a checkpoint as its manifest lists it."""

    size: int
    algorithm: str  # "xxh3-128" (format 2 and 3) or "sha256" (format 1)
    digest: str

    def to_dict(self) -> dict[str, Any]:
        return {"size": self.size, "algorithm": self.algorithm, "digest": self.digest}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FileEntry:
        if "sha256" in d:  # format 1
            return cls(int(d["size"]), "sha256", str(d["sha256"]))
        return cls(int(d["size"]), str(d.get("algorithm")), str(d.get("digest")))

    def verify(self, fname: str, data: bytes | memoryview) -> None:
        """Raise CorruptCheckpoint unless ``data`` has this entry's size and checksum."""
        if len(data) != self.size:
            raise CorruptCheckpoint(f"{fname} has {len(data)} bytes, manifest says "
                                    f"{self.size} (truncated?)")
        try:
            actual = checksum(data, self.algorithm)
        except ValueError as e:
            raise CorruptCheckpoint(f"{fname}: {e}") from None
        if actual != self.digest:
            raise CorruptCheckpoint(f"{fname} fails its {CHECKSUM_NAMES[self.algorithm]} "
                                    "check (corrupted bytes)")


@dataclass
class Manifest:
    """A checkpoint's manifest: written last, create-only (its presence is the commit), read
    through ``parse``, which refuses anything malformed. Every file of the checkpoint is in
    ``files``; the rest lets the tools list checkpoints without reading their train state."""

    format_version: int
    step: int
    epoch: int
    state_file: str
    train_state_file: str
    files: dict[str, FileEntry] = field(default_factory=dict)
    batch_in_epoch: int = 0
    world_size: int | None = None
    global_batch_size: int | None = None
    seed: int | None = None
    config_digest: str | None = None
    task: dict[str, Any] | None = None  # {"import": ..., "args": {...}}
    model_args: dict[str, Any] | None = None  # Task.describe_model()
    numerics: dict[str, Any] | None = None  # runtime.numerics.numeric_environment()
    reason: str | None = None  # "step", "timed", "epoch", "preempt", "max_steps", ...
    writer: str | None = None  # the token of the writer that committed it
    created_unix: float | None = None
    versions: dict[str, str] | None = None
    layout: str | None = None  # "sharded" (format 3), else one writer's files
    dcp_metadata_file: str | None = None  # sharded: DCP's metadata, as JSON
    shards: list[str] = field(default_factory=list)  # sharded: the shard files
    shard_world_size: int | None = None  # sharded: the ranks that wrote it

    @classmethod
    def new(cls, step: int, facts: dict[str, Any], format_version: int, state_file: str,
            train_state_file: str, **layout: Any) -> Manifest:
        """A new checkpoint's manifest (its files are added by the commit): the run's
        ``facts`` (epoch, position, world size, task, ...: the save policy's), the files'
        names, and ``layout``'s keys for a sharded one."""
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(format_version=format_version, step=step, state_file=state_file,
                   train_state_file=train_state_file, versions=library_versions(),
                   **{k: v for k, v in facts.items() if k in known and k != "step"}, **layout)

    @property
    def sharded(self) -> bool:
        return self.layout == SHARDED

    def to_json(self) -> bytes:
        d = {k: v for k, v in dataclasses.asdict(self).items()
             if v is not None and not (k == "shards" and not self.sharded)}
        d["files"] = {name: entry.to_dict() for name, entry in self.files.items()}
        return json.dumps(d, indent=1, sort_keys=True).encode()

    @classmethod
    def parse(cls, raw: bytes | memoryview) -> Manifest:
        """The manifest in ``raw``; CorruptCheckpoint naming what is wrong with it."""
        if not raw:
            raise CorruptCheckpoint(f"{MANIFEST} is empty (0 bytes: damaged after its commit, "
                                    "or lost in a crash of an unsynced filesystem)")
        try:
            d = json.loads(bytes(raw))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CorruptCheckpoint(f"{MANIFEST} is not valid JSON ({e})") from None
        if not isinstance(d, dict) or not isinstance(d.get("files"), dict):
            raise CorruptCheckpoint("manifest has no 'files' table")
        files = {}
        for fname, meta in d["files"].items():
            # Every file lives inside the checkpoint's own folder: a name that climbs out of
            # it would read (and trust) another checkpoint's or any other file.
            if not inside_folder(fname):
                raise CorruptCheckpoint(f"{MANIFEST} names {fname!r}, a path outside its "
                                        "checkpoint folder; nothing of this checkpoint is read")
            if not isinstance(meta, dict) or not isinstance(meta.get("size"), int):
                raise CorruptCheckpoint(f"{MANIFEST}: the entry of {fname!r} has no size")
            files[fname] = FileEntry.from_dict(meta)
        if d.get("format_version") not in READABLE_FORMATS:
            raise CorruptCheckpoint(f"format version {d.get('format_version')!r}, this "
                                    f"build reads {', '.join(map(str, READABLE_FORMATS))}")
        keys = ["step", "epoch", "state_file", "train_state_file"]
        if d.get("layout") == SHARDED:
            keys += ["dcp_metadata_file", "shards"]
        for key in keys:
            if key not in d:
                raise CorruptCheckpoint(f"manifest lacks {key!r}")
        if d.get("layout") == SHARDED and (not isinstance(d["shards"], list)
                                           or not set(d["shards"]) <= set(files)):
            raise CorruptCheckpoint("manifest's shards are not among its files")
        known = {f.name for f in dataclasses.fields(cls)}
        try:
            return cls(**{k: v for k, v in d.items() if k in known and k != "files"},
                       files=files)
        except TypeError as e:
            raise CorruptCheckpoint(f"{MANIFEST} is malformed ({e})") from None


@dataclass
class Loaded:
    name: str
    uri: str
    manifest: Manifest
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
        return self.manifest.sharded

    def model_state(self) -> dict[str, Any]:
        """The model's whole state dict (CPU tensors), whatever the layout: a sharded
        checkpoint's chunks are assembled in this process (no model, no process group)."""
        if not self.sharded:
            return self.state["model"]
        from .dcp_read import read_full_tensors

        return read_full_tensors(self.storage, self.name, self.dcp, "model.")


@dataclass
class Entry:
    """One folder below the root as ``ckpt ls`` reports it."""

    name: str
    uri: str
    step: int
    valid: bool
    reason: str = ""
    manifest: Manifest | None = None
    size: int = 0
    created: float | None = None


@dataclass
class TrainState:
    """Everything about progress that a checkpoint must carry besides the tensors."""

    epoch: int = 0  # epochs completed
    step: int = 0  # global optimizer steps completed
    batch_in_epoch: int = 0  # global batches of epoch ``epoch`` already trained
    history: list[dict[str, Any]] = field(default_factory=list)
    # Metric sums of the unfinished epoch (each global batch's sum over ranks, added in batch
    # order), carried across a restart so that the epoch's metrics come out exactly as in an
    # uninterrupted run.
    sums: dict[str, float] = field(default_factory=dict)
    seen: int = 0
    elapsed: float = 0.0
    resumes: int = 0  # times the run was resumed from a checkpoint (a fact, not progress)
    # Why this epoch is no longer bitwise equal to an uninterrupted run (a resume on another
    # numeric environment); recorded in its history entry as "not_bitwise".
    not_bitwise: list[str] = field(default_factory=list)
    # The evaluations --eval-every-steps made inside epochs: {"epoch", "step", eval_...}.
    evals: list[dict[str, Any]] = field(default_factory=list)
    # Why training ended before --epochs (early stopping: best.Selection.should_stop's record);
    # a run resumed from such a checkpoint trains no further.
    stopped: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        d = {"epoch": self.epoch, "step": self.step, "batch_in_epoch": self.batch_in_epoch,
             "history": self.history, "resumes": self.resumes, "evals": self.evals,
             "epoch_progress": {"sums": self.sums, "seen": self.seen,
                                "elapsed": self.elapsed, "not_bitwise": self.not_bitwise}}
        if self.stopped is not None:
            d["stopped"] = self.stopped
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainState:
        p = d.get("epoch_progress", {})
        if "sums" in p:
            sums = {str(k): float(v) for k, v in p["sums"].items()}
        else:  # written before tasks: the built-in task's per-batch loss sums and correct count
            sums = {"loss": sum(float(x) for x in p.get("loss_steps", [])),
                    "acc": float(p.get("correct", 0))} if p.get("seen") else {}
        return cls(int(d["epoch"]), int(d["step"]), int(d.get("batch_in_epoch", 0)),
                   list(d.get("history", [])), sums, int(p.get("seen", 0)),
                   float(p.get("elapsed", 0.0)), int(d.get("resumes", 0)),
                   [str(x) for x in p.get("not_bitwise", [])], list(d.get("evals", [])),
                   d.get("stopped"))
