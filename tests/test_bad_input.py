"""Bad input (issue 10): each case gets a clear message naming the flag or file at fault, the
right exit code, and never costs a good checkpoint.

1. a manifest naming a path outside its checkpoint folder      invalid, skipped, reported
2. zero-length and truncated files                             skipped, resume from the one before
3. a checkpoint of another architecture                        exit 2, checkpoint untouched
4. unknown keys, wrong types, zero or negative sizes           exit 2, the key and file named
5. a missing bucket                                            exit 2, the bucket named
6. wrong credentials (403)                                     exit 2, not retried, no secret shown
7. the disk full while saving                                  previous checkpoint intact, 140
8. a known secret                                              found in no log, file or exception

Training runs are single processes on a tiny MLP (4 steps per epoch, about 3 s each). Already
covered elsewhere and not repeated here: half-truncated, bit-flipped, deleted and garbage files
(tests/test_store_s3.py), no valid checkpoint on S3 (tests/test_faults.py), a --model change
(tests/test_compat.py), every config problem reported at once (tests/test_config.py).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
from pathlib import Path

import pytest

from ftrain import ckpt as ckpt_tool
from ftrain.checkpoint import step_dirname
from ftrain.storage import StorageError
from tests.helpers import assert_secret_absent

# 64 samples in global batches of 16: 4 steps per epoch, 8 in all; a 54 KiB checkpoint.
TINY = ["--synthetic-train-size", "64", "--synthetic-test-size", "32", "--batch-size", "16",
        "--epochs", "2", "--model", "mlp", "--width", "8", "--depth", "1",
        "--log-every-steps", "0", "--save-every-seconds", "0"]
D2, D4, D6, D10, D20 = (step_dirname(s) for s in (2, 4, 6, 10, 20))


def tool(capsys, *argv: str) -> tuple[int, str]:
    code = ckpt_tool.main(list(argv))
    out = capsys.readouterr()
    return code, out.out + out.err


def fingerprint(folder: Path) -> dict[str, str]:
    """Every file below ``folder`` with the SHA-256 of its bytes: 'untouched' means equal."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def state_file(folder: Path) -> Path:
    return next(folder.glob("state-*.pt"))


# ---------------------------------------------------------------------------- 8. secrets
def test_assert_secret_absent_finds_it(tmp_path):
    """The search itself: in text, in a nested file (as bytes), in a blob, in an exception's
    cause, JSON-escaped."""
    secret = 'k3y"/+=' + os.urandom(4).hex()
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "b" / "events.bin").write_bytes(b"\x00\x01" + secret.encode() + b"\xff")
    for kwargs in ({"texts": [f"x {secret} y"]}, {"paths": [tmp_path]},
                   {"blobs": {"k": json.dumps({"s": secret}).encode()}}):
        with pytest.raises(AssertionError, match="secret found in"):
            assert_secret_absent(secret, **kwargs)
    try:
        try:
            raise OSError(errno.EACCES, f"denied for {secret}")
        except OSError as inner:
            raise StorageError("read failed") from inner
    except StorageError as e:
        with pytest.raises(AssertionError, match="secret found in exception"):
            assert_secret_absent(secret, exceptions=[e])
    assert assert_secret_absent("not-there", texts=["a"], paths=[tmp_path]) == 2
