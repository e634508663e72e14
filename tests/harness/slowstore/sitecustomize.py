"""Test-only, for a subprocess whose PYTHONPATH starts with this folder (stores.slow_store_env):
every checkpoint commit (the create-only manifest write) first sleeps $FTT_TEST_PAUSE_IN_SAVE
seconds, so that a kill can land inside a save, or storage can be slower than the saves.
Without the variable nothing is changed."""

import os
import time

_PAUSE = float(os.environ.get("FTT_TEST_PAUSE_IN_SAVE") or 0)

if _PAUSE:
    try:
        from ftrain.storage import Storage
    except ImportError:  # a process that never trains (torchrun's agent without ftrain)
        Storage = None
    if Storage is not None:
        _write = Storage.write

        def _slow_write(self, rel, data, create_only=False):
            if create_only and rel.endswith("/manifest.json"):
                time.sleep(_PAUSE)
            return _write(self, rel, data, create_only=create_only)

        Storage.write = _slow_write
