"""Host syncs of the training loop on a GPU, counted by where they come from.

    python -m launch.sync_check [training flags]     # e.g. --epochs 2 --log-every-steps 0

Runs the job in this process with ``torch.cuda.set_sync_debug_mode("warn")``: CUDA then warns
at every operation that makes the host wait for the device (``.item()``, ``.tolist()`` of a
device tensor, a copy to pageable memory, ``nonzero``...). Each warning is counted at the
innermost frame of our own code that caused it. A location whose count is about the number of
training steps syncs every step; the loop is meant to have none (the metric sums stay on the
device until a logging step or the epoch's end). Explicit ``torch.cuda.synchronize()`` calls
(one per checkpoint snapshot) are not counted by CUDA's check. Needs a CUDA device.
"""

from __future__ import annotations

import collections
import re
import sys
import traceback
import warnings
from pathlib import Path

SYNC = re.compile(r"synchronizing CUDA operation", re.I)


def main(argv: list[str] | None = None) -> int:
    import torch

    if not torch.cuda.is_available():
        print("launch.sync_check: torch sees no CUDA device here", file=sys.stderr)
        return 2
    argv = list(sys.argv[1:] if argv is None else argv)
    counts: collections.Counter[str] = collections.Counter()
    shown = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if not SYNC.search(str(message)):
            return shown(message, category, filename, lineno, file, line)
        ours = [f for f in traceback.extract_stack()[:-1]
                if "/ftrain/" in f.filename or "/launch/" in f.filename]
        ours = [f for f in ours if not f.filename.endswith("sync_check.py")]
        where = " <- ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}"
                            for f in reversed(ours[-3:])) or f"{filename}:{lineno}"
        counts[where] += 1

    warnings.showwarning = show
    warnings.filterwarnings("always", message=".*synchronizing CUDA operation.*")
    from ftrain.train import main as train_main

    torch.cuda.init()
    torch.cuda.set_sync_debug_mode("warn")
    rc = train_main(argv)
    torch.cuda.set_sync_debug_mode("default")
    total = sum(counts.values())
    print(f"sync_check: exit {rc}; {total} synchronizing CUDA operations at "
          f"{len(counts)} places (count, innermost frames of ours):")
    for where, n in counts.most_common():
        print(f"{n:8d}  {where}")
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
