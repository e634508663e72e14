"""Test-only, for a subprocess whose PYTHONPATH starts with this folder: a full disk below
``$FTT_TEST_DISK`` where the tests may not mount a small tmpfs (tests/integration/test_bad_input.py).

Every file opened for writing below that folder shares a budget of
``$FTT_TEST_DISK_FREE_BYTES``; a write past it writes what still fits and raises ENOSPC, as a
full filesystem does. Without ``$FTT_TEST_DISK`` nothing is changed.
"""

import builtins
import errno
import os

_DISK = os.environ.get("FTT_TEST_DISK")

if _DISK:
    _ROOT = os.path.realpath(_DISK) + os.sep
    _left = [int(os.environ.get("FTT_TEST_DISK_FREE_BYTES", "0"))]
    _real_open = builtins.open

    class _OnFullDisk:
        def __init__(self, fh):
            self._fh = fh

        def write(self, data):
            view = memoryview(data).cast("B")
            n = min(len(view), _left[0])
            if n:
                self._fh.write(view[:n])
                _left[0] -= n
            if n < len(view):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return n

        def __getattr__(self, name):
            return getattr(self._fh, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self._fh.close()

    def _open(file, mode="r", *args, **kwargs):
        fh = _real_open(file, mode, *args, **kwargs)
        if (isinstance(file, (str, bytes, os.PathLike)) and any(c in mode for c in "wax+")
                and os.path.realpath(os.fsdecode(file)).startswith(_ROOT)):
            return _OnFullDisk(fh)
        return fh

    builtins.open = _open
