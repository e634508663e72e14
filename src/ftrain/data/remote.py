"""A remote --data-dir (s3://...) copied once into a node-local cache."""

from __future__ import annotations

import logging
import os

from .items import DataError

log = logging.getLogger(__name__)


def fetch_remote_data_dir(url: str, cache_root: str, storage_options: dict) -> str:
    """Copy a remote data folder (e.g. s3://bucket/datasets) into a node-local cache once.

    Every file is downloaded through Storage (retries, atomic per file) and its size checked
    against the listing; a marker written last records a complete copy, so an interrupted copy
    is redone. Returns the local folder. Called by one process per node (local rank 0); the
    others wait at a barrier and then find the marker. Raises DataError naming --data-dir.
    """
    import hashlib
    import shutil

    from ..storage import Storage

    local = os.path.join(cache_root, hashlib.sha256(url.encode()).hexdigest()[:16])
    marker = os.path.join(local, ".complete")
    if os.path.exists(marker):
        return local
    storage = Storage(url, storage_options)
    files = storage.walk()
    if not files:
        raise DataError(f"--data-dir {url}: no files there; check the URL and the credentials")
    tmp = local + f".partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    log.info("fetching --data-dir %s (%d files, %.1f MiB) into %s", url, len(files),
             sum(files.values()) / 2**20, local)
    for rel, size in sorted(files.items()):
        dest = os.path.join(tmp, *rel.split("/"))
        storage.download(rel, dest)
        if os.path.getsize(dest) != size:
            raise DataError(f"--data-dir {url}: {rel} arrived with {os.path.getsize(dest)} bytes, "
                            f"the listing says {size}; rerun to fetch it again")
    shutil.rmtree(local, ignore_errors=True)
    os.makedirs(cache_root, exist_ok=True)
    os.replace(tmp, local)
    with open(marker, "w") as fh:
        fh.write(url + "\n")
    return local
