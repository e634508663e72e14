"""Inference from a checkpoint, on any machine (GPU-saved checkpoints load on CPU).

    python -m ftrain.predict --checkpoint URI [--split test] [--limit N] [--device auto]

The model is rebuilt from the task the checkpoint records (its import string and arguments):
a user's task needs the same code on the path. Prints the first predictions and the task's
metrics over the split (for classifiers, the accuracy).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import torch
from torch.utils.data import DataLoader, Subset

from .checkpoint import CorruptCheckpoint, load_uri
from .checkpoint.rules import checkpoint_task
from .ckpt import load_weights
from .config import json_object
from .core.batching import to_device
from .core.sums import split_loss
from .data.items import DataError, SeededItems
from .errors import InputError
from .runtime import exitcodes
from .runtime.distributed import choose_device
from .tasks import TaskContext, TaskError, load_task


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ftrain.predict", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True,
                   help="checkpoint folder, a --checkpoint-dir (newest valid one), or "
                        "DIR/best (the best by the run's --best-metric)")
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
        options = json_object(args.storage_options, '{"anon": false}')
    except ValueError as e:
        print(f"error: --storage-options: {e}", file=sys.stderr)
        return exitcodes.INVALID
    try:
        loaded = load_uri(args.checkpoint, options)
    except (CorruptCheckpoint, FileNotFoundError) as e:
        print(f"error: --checkpoint {args.checkpoint}: {e}", file=sys.stderr)
        return exitcodes.INVALID
    except Exception as e:  # noqa: BLE001 - StorageError and the like: name the flag
        print(f"error: --checkpoint {args.checkpoint}: {type(e).__name__}: {e}", file=sys.stderr)
        return exitcodes.INVALID
    cfg = loaded.train_state.get("config", {})
    try:
        device = choose_device(args.device, 0)
        task = load_task(checkpoint_task(loaded.train_state, loaded.manifest))
        seed = int(cfg.get("seed", 0))
        ctx = TaskContext(seed, args.data_dir or cfg.get("data_dir", "./data"), False, 0, 1, 0)
        train_set, test_set = task.datasets(ctx)
    except (ValueError, TaskError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return exitcodes.INVALID
    model = task.build_model()
    try:
        load_weights(loaded, model)
    except RuntimeError as e:
        print(f"error: --checkpoint {args.checkpoint}: the weights do not fit the task's model: "
              f"{str(e)[:300]}", file=sys.stderr)
        return exitcodes.INVALID
    if loaded.state.get("task"):
        task.load_state_dict(loaded.state["task"])
    model.to(device).eval()
    ds: Any = SeededItems(test_set if args.split == "test" else train_set, seed)
    if args.limit:
        ds = Subset(ds, range(min(args.limit, len(ds))))
    names: list[str] = []
    totals: list[float] = []
    items = correct = 0
    classifier = True
    shown = 0
    try:
        with torch.no_grad():
            for (inputs, targets), idx in DataLoader(ds, batch_size=512):
                inputs, targets = to_device(inputs, device), to_device(targets, device)
                out = task.forward(model, inputs)
                _, sums = split_loss(type(task).__name__, task.loss(out, targets))
                if not names:
                    names, totals = list(sums), [0.0] * len(sums)
                totals = [t + float(sums[n]) for t, n in zip(totals, names, strict=True)]
                items += len(idx)
                pred = task.predict(out).cpu()
                target = targets.cpu() if isinstance(targets, torch.Tensor) else None
                classifier = classifier and target is not None and target.shape == pred.shape \
                    and pred.dim() == 1
                if classifier:
                    correct += int((pred == target).sum())
                for i in range(len(idx)):
                    if shown >= args.show:
                        break
                    print(f"sample {int(idx[i]):>6}  predicted {_short(pred[i])}"
                          + (f"  (p={float(out[i].softmax(-1)[pred[i]]):.3f})  label "
                             f"{int(target[i])}" if classifier else ""))
                    shown += 1
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return exitcodes.INVALID
    metrics = task.metrics(dict(zip(names, totals, strict=True)), items)
    print(f"checkpoint {loaded.uri} (step {loaded.manifest.step}): "
          + " ".join(f"{k} {v:.4f}" for k, v in metrics.items()) + f" over {items} {args.split} "
          "items")
    if classifier:
        print(f"checkpoint {loaded.uri} (step {loaded.manifest.step}): accuracy on "
              f"{args.split} {correct}/{items} = {correct / max(items, 1):.4f}")
    return exitcodes.OK


def _short(t: torch.Tensor) -> str:
    """One prediction: a number, or the start of a sequence."""
    if t.dim() == 0:
        value = t.item()
        return f"{value:.4g}" if isinstance(value, float) else str(value)
    values = t.reshape(-1).tolist()
    return str(values[:16])[:-1] + (", ...]" if len(values) > 16 else "]")


def cli() -> None:
    """Console script ``ftrain-predict``."""
    exitcodes.exit_now(main())


if __name__ == "__main__":
    cli()
