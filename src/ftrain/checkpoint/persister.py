"""The persister: a save snapshots into host buffers (rawstate.Arena) and a background thread
writes and commits it (store.py), then applies retention. The sharded variant has every rank
write its own shard and rank 0 commit the whole."""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import torch

from ..runtime.memory import PeakRss
from ..storage import StorageError, redact
from .best import Selection
from .format import (
    FORMAT_VERSION,
    SHARDED,
    SHARDED_FORMAT,
    ZIP_FORMAT,
    Manifest,
    library_versions,
    step_dirname,
)
from .rawstate import Arena, encode
from .staging import HostBuffers
from .store import CheckpointStore

log = logging.getLogger(__name__)


class SaveTimeout(Exception):
    """A save did not finish in the time it was given; it goes on in the background."""


@dataclass
class SaveRequest:
    step: int
    state: dict[str, Any]  # tensors already snapshotted into buffer set ``buffers``
    train_state: dict[str, Any]
    facts: dict[str, Any]  # the run's facts for the manifest (Manifest.new)
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

    def __init__(self, store: CheckpointStore, keep_last: int, orphan_grace_s: float,
                 selection: Selection | None = None) -> None:
        self.store = store
        self.keep_last = keep_last
        self.selection = selection  # --keep-best: from the train state just committed
        library_versions()  # read here, not by the persister thread while the loop trains
        self.orphan_grace_s = orphan_grace_s
        self.is_main = True  # logs commits and applies retention
        self.writer = uuid.uuid4().hex[:12]
        self._sets: tuple[Any, Any] = self._buffer_sets()
        self._cond = threading.Condition()
        self._pending: SaveRequest | None = None  # snapshotted, waiting for the persister
        self._running: SaveRequest | None = None  # being persisted
        self._results: dict[int, bool] = {}  # serial -> committed (finished requests)
        self._serial = 0
        self._closed = False
        self._thread = threading.Thread(target=self._work, name="ckpt-persist", daemon=True)
        self.consecutive_failures = 0
        self.last_committed_step: int | None = None
        self._own_commit: int | None = None  # the newest step this writer's files committed
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

    def _buffer_sets(self) -> tuple[Any, Any]:
        return Arena(), Arena()

    def save(self, step: int, state: dict[str, Any], train_state: dict[str, Any],
             facts: dict[str, Any], blocking: bool = False,
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
            req = SaveRequest(step, snap, json.loads(json.dumps(train_state)), dict(facts),
                              free, self._serial)
            self._pending = req
            self._cond.notify_all()
        self.last_stall_s = time.perf_counter() - t0
        log.debug("snapshot of step %d: %.1f ms", step, self.last_stall_s * 1e3)
        if blocking:
            return self._wait_for(req, deadline)
        return None

    def committed_by_me(self, step: int) -> bool:
        """Whether this writer's files are the committed checkpoint of ``step`` (not another
        writer's, which won the create-only manifest)."""
        return self._own_commit == step

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
        train_file = f"train_state-{self.writer}.json"
        raw = encode(req.state, self._sets[req.buffers])
        if raw is not None:  # the staged bytes as they are, hashed while written (format 4)
            state_file, version, body = f"state-{self.writer}.bin", FORMAT_VERSION, raw
        else:  # a tensor the raw layout cannot carry: torch.save, straight to storage
            state_file, version = f"state-{self.writer}.pt", ZIP_FORMAT
            body = lambda fh: torch.save(req.state, fh)  # noqa: E731
        files = {state_file: body,
                 train_file: json.dumps(req.train_state, sort_keys=True).encode()}
        manifest = Manifest.new(req.step, req.facts, version, state_file, train_file)
        return self.store.commit(req.step, files, manifest, self.writer)

    def _persist(self, req: SaveRequest) -> bool:
        name = step_dirname(req.step)
        try:
            committed = self._write(req)
            secs = time.monotonic() - req.started
            self.memory.log(req.serial, f"save of step {req.step}", log)
            if committed and self.is_main:
                uri, mib = self.store.storage.uri(name), self.store.last_commit_bytes / 2**20
                log.info("checkpoint %s committed (%.1f MiB, %.2fs)", uri, mib, secs,
                         extra={"fields": {"event": "committed", "step": req.step, "uri": uri,
                                           "mib": mib, "seconds": secs}})
            self.consecutive_failures = 0
            self.last_committed_step = req.step
            if committed:
                self._own_commit = req.step
            self.committed += 1
            self.last_commit_time = time.time()
            if self.is_main:
                try:
                    self.store.retain(self.keep_last, self.orphan_grace_s, newest=req.step,
                                      best=self._best(req.train_state))
                except (StorageError, OSError) as e:
                    log.warning("retention after %s failed (will retry next save): %s", name, e)
            return True
        except Exception as e:  # noqa: BLE001 - a failed save must not kill training
            self.memory.stop(req.serial)
            self._failed(name, e)
            return False

    def _best(self, train_state: dict[str, Any]):
        """--keep-best's choice among the committed steps, from the committed history."""
        selection = self.selection
        if selection is None or selection.keep <= 0:
            return None
        return lambda committed: selection.keep_steps(train_state, committed)

    def _failed(self, name: str, e: BaseException) -> None:
        self.consecutive_failures += 1
        self.failed += 1
        uri, error = self.store.storage.uri(name), f"{type(e).__name__}: {redact(str(e))[:2000]}"
        log.error("SAVE FAILED for %s (%d in a row): %s", uri, self.consecutive_failures, error,
                  extra={"fields": {"event": "save_failed", "uri": uri, "error": error,
                                    "in_a_row": self.consecutive_failures}})

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
                 group: Any, is_main: bool, world_size: int,
                 selection: Selection | None = None) -> None:
        # Imported here, not first in the persister thread while the loop snapshots.
        import torch.distributed.checkpoint  # noqa: F401

        from . import dcp  # noqa: F401

        self.group = group  # None: one process, nobody to agree with
        self.world_size = world_size
        super().__init__(store, keep_last, orphan_grace_s, selection)
        self.is_main = is_main

    def _buffer_sets(self) -> tuple[Any, Any]:
        return HostBuffers(), HostBuffers()  # DTensor shards, written by DCP

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
            manifest = Manifest.new(req.step, req.facts, SHARDED_FORMAT, state_file, train_file,
                                    layout=SHARDED, dcp_metadata_file=meta_file,
                                    shards=sorted(shards), shard_world_size=self.world_size)
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
