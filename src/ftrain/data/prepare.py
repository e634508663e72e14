"""The task's datasets on every rank: a remote --data-dir copied once per node, the task's
prepare_data once per node, then its datasets; a problem on any rank is every rank's."""

from __future__ import annotations

import os
from typing import Any

from ..config import Config
from ..errors import InputError
from ..runtime.distributed import Collectives, DistInfo
from ..storage import StorageAccessError, StorageError
from ..tasks import Task, TaskContext, TaskError
from .items import DataError
from .remote import fetch_remote_data_dir


def task_datasets(cfg: Config, info: DistInfo, coll: Collectives, task: Task,
                  options: dict[str, Any]) -> tuple[Any, Any]:
    """The task's datasets on every rank. Bad input: InputError on every rank (exit 2);
    storage outage: StorageError (140)."""
    error: tuple[str, str] | None = None
    try:
        data_dir = cfg.data_dir
        if "://" in data_dir:
            data_dir = node_local_copy(cfg.data_dir, cfg.data_cache, info, coll, options)
        ctx = TaskContext(cfg.seed, data_dir, cfg.download, info.rank, info.world_size,
                          info.local_rank)
        if info.is_distributed:
            # One download per node; the others read what it fetched. The barrier is reached
            # whatever happens, so a failed download cannot leave the ranks in other collectives.
            prepare_error = None
            if info.local_rank == 0:
                try:
                    task.prepare_data(ctx)
                except (DataError, OSError) as e:
                    prepare_error = e
            coll.barrier()
            if prepare_error is not None:
                raise prepare_error
        else:
            task.prepare_data(ctx)
        train_set, test_set = task.datasets(ctx)
    except StorageAccessError as e:  # no such bucket, access denied: fix the input
        error = ("input", f"--data-dir {cfg.data_dir}: {e}")
    except StorageError as e:
        error = ("storage", f"--data-dir {cfg.data_dir}: {e}")
    except (DataError, OSError, TaskError) as e:
        error = ("input", str(e))
    errors = coll.gather_objects(error) if info.is_distributed else [error]
    found = [e for e in errors if e is not None]
    if found:
        kind, text = next((e for e in found if e[0] == "input"), found[0])
        raise (StorageError if kind == "storage" else InputError)(text)
    return train_set, test_set


def node_local_copy(url: str, cache: str, info: DistInfo, coll: Collectives,
                    options: dict[str, Any]) -> str:
    """Local rank 0 fetches a remote --data-dir into the node's cache (--data-cache); the
    others wait."""
    cache = os.path.abspath(cache)
    error = None
    if info.local_rank == 0:
        try:
            fetch_remote_data_dir(url, cache, options)
        except (DataError, StorageError, OSError) as e:
            error = e
    coll.barrier()
    if error is not None:
        raise error
    return fetch_remote_data_dir(url, cache, options)  # cached now: returns at once
