"""Inference from a checkpoint, on any machine (GPU-saved checkpoints load on CPU).

    python -m src.predict --checkpoint URI [--split test] [--limit N] [--device auto]
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
from torch.utils.data import DataLoader, Subset

from . import exitcodes
from .checkpoint import CorruptCheckpoint, load_uri
from .data import DataError, build_datasets
from .distributed import choose_device
from .models import build_model
from .storage import StorageError


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m src.predict", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True,
                   help="checkpoint folder, or a --checkpoint-dir (newest valid one)")
    p.add_argument("--split", choices=("test", "train"), default="test")
    p.add_argument("--limit", type=int, default=0, help="predict the first N samples (0: all)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--data-dir", default=None, help="override the checkpoint's --data-dir")
    p.add_argument("--show", type=int, default=10, help="print this many individual predictions")
    p.add_argument("--storage-options", default="", help="extra fsspec options as JSON")
    args = p.parse_args(argv)
    if args.limit < 0:
        print("error: --limit must be >= 0", file=sys.stderr)
        return exitcodes.INVALID
    try:
        options = json.loads(args.storage_options) if args.storage_options else {}
        loaded = load_uri(args.checkpoint, options)
    except json.JSONDecodeError as e:
        print(f"error: --storage-options is not valid JSON: {e}", file=sys.stderr)
        return exitcodes.INVALID
    except (CorruptCheckpoint, FileNotFoundError, StorageError) as e:
        print(f"error: --checkpoint {args.checkpoint}: {e}", file=sys.stderr)
        return exitcodes.INVALID
    cfg = loaded.train_state.get("config", {})
    try:
        device = choose_device(args.device, 0)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return exitcodes.INVALID
    model = build_model(loaded.manifest["model_args"])
    model.load_state_dict(loaded.state["model"])
    model.to(device).eval()
    try:
        train_set, test_set = build_datasets(
            cfg.get("dataset", "synthetic"), args.data_dir or cfg.get("data_dir", "./data"), False,
            int(cfg.get("seed", 0)), int(cfg.get("synthetic_train_size", 12288)),
            int(cfg.get("synthetic_test_size", 2048)))
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return exitcodes.INVALID
    ds = test_set if args.split == "test" else train_set
    if args.limit:
        ds = Subset(ds, range(min(args.limit, len(ds))))
    correct = total = 0
    shown = 0
    with torch.no_grad():
        for x, y, idx in DataLoader(ds, batch_size=512):
            out = model(x.to(device))
            prob = out.softmax(1)
            pred = prob.argmax(1).cpu()
            correct += int((pred == y).sum())
            total += len(y)
            for i in range(len(y)):
                if shown >= args.show:
                    break
                print(f"sample {int(idx[i]):>6}  predicted {int(pred[i])}  "
                      f"(p={float(prob[i, pred[i]]):.3f})  label {int(y[i])}")
                shown += 1
    print(f"checkpoint {loaded.uri} (step {loaded.manifest['step']}): accuracy on "
          f"{args.split} {correct}/{total} = {correct / max(total, 1):.4f}")
    return exitcodes.OK


def cli() -> None:
    """Console script ``ftrain-predict``."""
    sys.exit(main())


if __name__ == "__main__":
    cli()
