"""The only code that moves bytes: one fsspec code path for local folders, S3 and memory://
(fs.py), local atomic writes (local.py), checksums computed as the bytes pass
(checksums.py), which failures are retried (errors.py), and the process's defaults
(tuning.py)."""

from .checksums import CHECKSUM, CHECKSUM_NAMES, HashingWriter, checksum, new_hasher
from .errors import RetryPolicy, StorageAccessError, StorageError, is_transient, redact
from .fs import Storage
from .tuning import Tuning, tune

__all__ = ["CHECKSUM", "CHECKSUM_NAMES", "HashingWriter", "RetryPolicy", "Storage",
           "StorageAccessError", "StorageError", "Tuning", "checksum", "is_transient",
           "new_hasher", "redact", "tune"]
