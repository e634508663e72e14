"""Test-only, for a subprocess whose PYTHONPATH starts with this folder (stores.slow_store_env,
stores.held_commit_env): every checkpoint commit (the create-only manifest write) first sleeps
$FTT_TEST_PAUSE_IN_SAVE seconds, so that a kill can land inside a save, or storage can be slower
than the saves; the commit of the step folder $FTT_TEST_HOLD_COMMIT never happens (it touches
the file $FTT_TEST_HOLD_MARK and waits), so that a SIGKILL lands after that step was trained
and before it was committed. Without the variables nothing is changed."""

import os
import time

_PAUSE = float(os.environ.get("FTT_TEST_PAUSE_IN_SAVE") or 0)
_HOLD = os.environ.get("FTT_TEST_HOLD_COMMIT") or ""
_MARK = os.environ.get("FTT_TEST_HOLD_MARK") or ""

if _PAUSE or _HOLD:
    try:
        from ftrain.storage import Storage
    except ImportError:  # a process that never trains (torchrun's agent without ftrain)
        Storage = None
    if Storage is not None:
        _write = Storage.write

        def _slow_write(self, rel, data, create_only=False):
            if create_only and rel.endswith("/manifest.json"):
                if _HOLD and rel.split("/")[-2] == _HOLD:
                    if _MARK:
                        open(_MARK, "w").close()
                    while True:
                        time.sleep(60)
                time.sleep(_PAUSE)
            return _write(self, rel, data, create_only=create_only)

        Storage.write = _slow_write
