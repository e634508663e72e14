"""The process's storage defaults (the retry policy, S3's part size and concurrency) and the
s3fs options every S3 Storage starts from."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from .errors import RetryPolicy


# Large objects move in parts, several at once: a checkpoint file at or above two parts is a
# multipart upload of parts of ``s3_part_size`` bytes, ``s3_concurrency`` in flight, and a read
# of one above a part is that many parallel ranged GETs into one buffer. One stream to S3 runs
# at ~100 MB/s; parts in parallel scale with the connection.
@dataclass
class Tuning:
    """The process's storage defaults: the retry policy and S3's part size and concurrency.
    The training command sets them from its options (--storage-retry-*, --s3-*); the tools
    take them from the same FTT_* variables. Storage options given explicitly
    (``{"max_concurrency": N, "default_block_size": BYTES}``) win over them."""

    retry: RetryPolicy
    s3_part_size: int
    s3_concurrency: int

    @classmethod
    def from_env(cls) -> Tuning:
        return cls(RetryPolicy.from_env(),
                   int(float(os.environ.get("FTT_S3_PART_MB", "64")) * 2**20),
                   int(os.environ.get("FTT_S3_CONCURRENCY", "8")))


_TUNED: Tuning | None = None


def tuning() -> Tuning:
    """This process's storage defaults: what ``tune`` set, else the FTT_* variables now."""
    return _TUNED or Tuning.from_env()


def tune(new: Tuning | None) -> Tuning | None:
    """Make ``new`` this process's storage defaults (None: the FTT_* variables again);
    returns what it replaces."""
    global _TUNED
    previous, _TUNED = _TUNED, new
    return previous


def s3_defaults(opts: dict[str, Any]) -> None:
    """Defaults for s3fs: honour AWS_ENDPOINT_URL (older botocore ignores it), path-style
    addressing for custom endpoints, no botocore retries (this module retries), and parallel
    parts for large objects."""
    opts.setdefault("max_concurrency", tuning().s3_concurrency)
    opts.setdefault("default_block_size", tuning().s3_part_size)
    config_kwargs = dict(opts.get("config_kwargs") or {})
    if "AWS_MAX_ATTEMPTS" not in os.environ and "AWS_RETRY_MODE" not in os.environ:
        config_kwargs.setdefault("retries", {"total_max_attempts": 1, "mode": "standard"})
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    custom = endpoint or opts.get("endpoint_url") or (opts.get("client_kwargs") or {}).get(
        "endpoint_url")
    if endpoint:
        client_kwargs = dict(opts.get("client_kwargs") or {})
        if "endpoint_url" not in opts:
            client_kwargs.setdefault("endpoint_url", endpoint)
        opts["client_kwargs"] = client_kwargs
    if custom:
        # A custom endpoint (MinIO, moto, Ceph) rarely answers virtual-host style requests.
        config_kwargs.setdefault("s3", {"addressing_style": "path"})
    opts["config_kwargs"] = config_kwargs
