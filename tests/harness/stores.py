"""Storage that is slow or held on purpose, injected where production code takes a Storage:
in-process as a subclass, in a subprocess through ``slow_store_env`` (a sitecustomize on its
PYTHONPATH). No test hook lives in the ftrain package itself."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

from ftrain.checkpoint import MANIFEST
from ftrain.storage import Storage

PAUSE_ENV = "FTT_TEST_PAUSE_IN_SAVE"  # read by slowstore/sitecustomize.py only
SITE = Path(__file__).resolve().parent / "slowstore"


class HeldStorage(Storage):
    """Every commit (the create-only manifest write) waits: ``pause`` seconds, or with
    ``held`` until ``release()``. ``committing`` is set when a commit starts waiting: the
    checkpoint's files are written, its manifest is not."""

    def __init__(self, root: str, pause: float = 0.0, held: bool = False,
                 options: dict[str, Any] | None = None) -> None:
        super().__init__(root, options)
        self.pause = pause
        self.committing = threading.Event()
        self._open = threading.Event()
        if not held:
            self._open.set()

    def release(self) -> None:
        self._open.set()

    def write(self, rel: str, data: Any, create_only: bool = False) -> tuple[int, str]:
        if create_only and rel.endswith("/" + MANIFEST):
            self.committing.set()
            if not self._open.wait(120):
                raise TimeoutError("a held commit was never released")
            time.sleep(self.pause)
        return super().write(rel, data, create_only=create_only)


def slow_store_env(seconds: float, env: dict[str, str] | None = None) -> dict[str, str]:
    """``env`` (default: this process's) for a subprocess whose checkpoint commits take
    ``seconds`` each: the sitecustomize in slowstore/ runs first in it."""
    out = dict(os.environ if env is None else env)
    out[PAUSE_ENV] = str(seconds)
    out["PYTHONPATH"] = os.pathsep.join(p for p in (str(SITE), out.get("PYTHONPATH", "")) if p)
    return out


def held_commit_env(step_folder: str, mark: Path, env: dict[str, str] | None = None
                    ) -> dict[str, str]:
    """``env`` for a subprocess that never commits ``step_folder`` (step_0000000032): its
    manifest write touches ``mark`` and waits for ever, so that the test SIGKILLs it after the
    step was trained and before it was committed."""
    out = dict(os.environ if env is None else env)
    out.update(FTT_TEST_HOLD_COMMIT=step_folder, FTT_TEST_HOLD_MARK=str(mark))
    out["PYTHONPATH"] = os.pathsep.join(p for p in (str(SITE), out.get("PYTHONPATH", "")) if p)
    return out


def die_after_env(rank: int, logged_step: int = 0, env: dict[str, str] | None = None,
                  in_eval_step: int = 0) -> dict[str, str]:
    """``env`` for a training subprocess whose worker of ``rank`` SIGKILLs itself right after
    it logged ``logged_step``, or as it starts the evaluation inside the epoch after step
    ``in_eval_step`` (the sitecustomize in dieafter/)."""
    out = dict(os.environ if env is None else env)
    out.update(FTT_TEST_DIE_RANK=str(rank), FTT_TEST_DIE_AFTER_LOGGED_STEP=str(logged_step),
               FTT_TEST_DIE_IN_EVAL_STEP=str(in_eval_step))
    folder = Path(__file__).resolve().parent / "dieafter"
    out["PYTHONPATH"] = os.pathsep.join(p for p in (str(folder), out.get("PYTHONPATH", "")) if p)
    return out
