"""Retention: rank 0 alone deletes, only after the new checkpoint committed, keeps at least 2,
and removes a manifest first so that a half-deleted checkpoint never looks committed."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from .format import MANIFEST, CorruptCheckpoint

if TYPE_CHECKING:
    from .store import CheckpointStore

log = logging.getLogger(__name__)


def retain(store: CheckpointStore, keep_last: int, grace_s: float, now: float | None = None,
           newest: int | None = None,
           best: Callable[[list[int]], set[int]] | None = None) -> list[str]:
    """Delete committed checkpoints beyond the newest ``keep_last`` (manifest first, so a
    half-deleted one never looks committed), and leftovers of crashed writers older than
    ``grace_s``. Returns what it deleted.

    Only checkpoints whose manifest parses count towards ``keep_last``, so a damaged
    manifest never pushes the last good checkpoints out. ``newest``: the step just
    committed; committed folders of later steps (corrupt ones a resume skipped, or another
    run's) are neither counted nor deleted, so they never push this run's checkpoints out.
    ``best``: given the committed steps (up to ``newest``), the ones --keep-best keeps besides
    the newest ``keep_last``. On S3 a "folder" is a key prefix without a time of its own: a
    leftover's age is that of its newest object.
    """
    keep_last = max(2, keep_last)
    now = time.time() if now is None else now
    deleted = []
    kept = 0
    listed_dirs = [(step, name, store.storage.listdir(name)) for step, name in store.step_dirs()]
    committed = [step for step, _name, files in listed_dirs
                 if MANIFEST in files and (newest is None or step <= newest)]
    best_steps = best(committed) if best is not None and committed else set()
    for step, name, files in listed_dirs:
        if MANIFEST in files and newest is not None and step > newest:
            continue
        if MANIFEST not in files:
            if _age(store, name, files, now) > grace_s:
                log.info("removing %s: no manifest and untouched for over %.0fs (crashed "
                         "writer)", store.storage.uri(name), grace_s)
                store.storage.remove_tree(name)
                deleted.append(name)
            continue
        if kept >= keep_last and step in best_steps:
            continue  # one of the --keep-best (its strays went while it was among the newest)
        if kept >= keep_last:
            log.info("retention: deleting %s (keeping the newest %d%s)", store.storage.uri(name),
                     keep_last, " and the --keep-best ones" if best is not None else "")
            store.storage.remove(f"{name}/{MANIFEST}")
            store.storage.remove_tree(name)
            deleted.append(name)
            continue
        try:
            listed = set(store.read_manifest(name).files)
        except CorruptCheckpoint:
            continue  # does not count; deleted once keep_last good ones are newer
        kept += 1
        _remove_strays(store, name, files, listed, grace_s, now)
    return deleted


def _age(store: CheckpointStore, name: str, files: list[str], now: float) -> float:
    times = [t for f in files if (t := store.storage.modified(f"{name}/{f}")) is not None]
    if not times:
        t = store.storage.modified(name) if store.storage.is_local else None
        return now - t if t is not None else float("inf")
    return now - max(times)


def _remove_strays(store: CheckpointStore, name: str, files: list[str], listed: set[str],
                   grace_s: float, now: float) -> None:
    """Files in a committed folder that its manifest does not list (a losing writer's, an
    earlier failed attempt's, a quarantined manifest), once older than the grace period."""
    for f in files:
        if f not in listed and f != MANIFEST and _age(store, name, [f], now) > grace_s:
            log.info("removing stray %s", store.storage.uri(f"{name}/{f}"))
            store.storage.remove(f"{name}/{f}")
