"""Checkpoint tool, for local folders and s3:// URIs alike.

    python -m ftrain.ckpt ls ROOT                 step, epoch, time, size, valid or why not
    python -m ftrain.ckpt verify URI              exit 1 if anything is invalid
    python -m ftrain.ckpt inspect URI [--json]    step, epoch, world size, batch, seed, history
    python -m ftrain.ckpt export URI OUT.pth      the model's plain state_dict (CPU tensors)
    python -m ftrain.ckpt plot ROOT OUT.png       loss and accuracy curves from the history

URI is a checkpoint root (then the newest valid checkpoint in it), one step folder, or
ROOT/best (the best checkpoint by the run's --best-metric; ``ls`` marks it).
Extra fsspec options: --storage-options JSON (or FTT_STORAGE_OPTIONS).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
from typing import Any

import torch

from .checkpoint import CorruptCheckpoint, Loaded, load_uri, open_uri
from .checkpoint.best import Selection
from .checkpoint.rules import checkpoint_task
from .config import json_object
from .errors import InputError
from .runtime import exitcodes
from .storage import StorageError
from .tasks import TaskError, load_task


class _BadFlag(Exception):
    """A flag's value that cannot be used: exit 2, as train and predict do."""


def _options(args: argparse.Namespace) -> dict[str, Any]:
    try:
        return json_object(args.storage_options or os.environ.get("FTT_STORAGE_OPTIONS", ""),
                           '{"anon": false}')
    except ValueError as e:
        raise _BadFlag(f"--storage-options: {e}") from None


def _when(ts: float | None) -> str:
    if ts is None:
        return "-"
    return dt.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")


def cmd_ls(args: argparse.Namespace) -> int:
    # Given one step folder, list its root.
    store = open_uri(args.root, _options(args))[0]
    entries = store.entries()
    if not entries:
        print(f"no checkpoints under {args.root}")
        return 0
    marks = _best_marks(store, entries)
    print(f"{'STEP':>10}  {'EPOCH':>7}  {'TIME':19}  {'SIZE':>10}  STATUS")
    for e in entries:
        m = e.manifest
        epoch = "-" if m is None else f"{m.epoch}" + (f"+{m.batch_in_epoch}b"
                                                      if m.batch_in_epoch else "")
        size = f"{e.size / 2**20:.1f} MiB" if e.size else "-"
        status = "valid" if e.valid else f"INVALID: {e.reason}"
        mark = f"  {marks[e.step]}" if e.step in marks else ""
        print(f"{e.step:>10}  {epoch:>7}  {_when(e.created):19}  {size:>10}  {status}  "
              f"{e.name}{mark}")
    return 0


def _best_marks(store, entries) -> dict[int, str]:
    """--best-metric runs: "best", then "best 2" ... up to --keep-best, by the newest valid
    checkpoint's history, each with its score."""
    newest = next((e for e in entries if e.valid), None)
    if newest is None:
        return {}
    m = newest.manifest
    train_state = json.loads(store.storage.read(f"{newest.name}/{m.train_state_file}"))
    selection = Selection.from_train_state(train_state)
    if selection is None:
        return {}
    scores = dict(selection.scores(train_state))
    ranked = selection.ranked(train_state, [e.step for e in entries if e.valid])
    ranked = ranked[:max(1, selection.keep)]  # the best, and the ones --keep-best keeps
    return {step: f"{'best' if i == 0 else f'best {i + 1}'} ({selection.metric} "
                  f"{scores[step]:.6g})" for i, step in enumerate(ranked)}


def cmd_verify(args: argparse.Namespace) -> int:
    store, name = open_uri(args.uri, _options(args))
    if name is not None:
        try:
            store.load(name)
        except CorruptCheckpoint as e:
            print(f"INVALID {store.storage.uri(name)}: {e}")
            return 1
        print(f"valid {store.storage.uri(name)}")
        return 0
    entries = store.entries()
    if not entries:
        print(f"no checkpoints under {args.uri}")
        return 1
    bad = 0
    for e in entries:
        print(("valid   " if e.valid else "INVALID ") + e.uri + ("" if e.valid else f": {e.reason}"))
        bad += not e.valid
    print(f"{len(entries) - bad} valid, {bad} invalid")
    return 1 if bad else 0


def _load(args: argparse.Namespace) -> Loaded:
    return load_uri(args.uri, _options(args))


def summary(loaded: Loaded) -> dict[str, Any]:
    ts, m = loaded.train_state, loaded.manifest
    return {
        "uri": loaded.uri,
        "step": m.step,
        "epoch": m.epoch,
        "batch_in_epoch": m.batch_in_epoch,
        "world_size": m.world_size,
        "global_batch_size": m.global_batch_size,
        "seed": m.seed,
        "config_digest": m.config_digest,
        "model_args": m.model_args,
        "task": checkpoint_task(ts, m).to_dict(),
        "created_unix": m.created_unix,
        "versions": m.versions,
        "numerics": m.numerics,
        "reason": m.reason,
        "layout": m.layout or "single",
        "shards": len(m.shards),
        "history": ts.get("history", []),
        "config": ts.get("config", {}),
    }


def cmd_inspect(args: argparse.Namespace) -> int:
    loaded = _load(args)
    info = summary(loaded)
    if args.json:
        print(json.dumps(info, indent=2, sort_keys=True))
        return 0
    print(f"checkpoint   {info['uri']}")
    print(f"step         {info['step']}  (epochs done {info['epoch']}, batch "
          f"{info['batch_in_epoch']} of the next)")
    print(f"world size   {info['world_size']}   global batch {info['global_batch_size']}   "
          f"seed {info['seed']}")
    if info["layout"] == "sharded":
        print(f"layout       sharded (--parallel fsdp): {info['shards']} shard files, "
              "loadable on any world size")
    task = info["task"]
    print(f"task         {task['import']}  {json.dumps(task['args'], sort_keys=True)}")
    try:
        model = rebuild_model(loaded)
        count = sum(p.numel() for p in model.parameters())
        print(f"model        {type(model).__name__}, {count:,} parameters (rebuilt from the task)")
    except TaskError as e:
        print(f"model        cannot be rebuilt here: {e}")
    print(f"written      {_when(info['created_unix'])}  versions {info['versions']}")
    if info["numerics"]:  # bitwise resume needs the same (checkpoints since 2026-12)
        print("numerics     " + "  ".join(f"{k} {v}" for k, v in info["numerics"].items()))
    trained = [h for h in info["history"] if "imported" not in h]
    for h in info["history"]:
        if "imported" in h:  # --init-from a plain script's checkpoint
            print(f"imported     {h['epoch']} epochs from a plain checkpoint: {h['imported']}")
    if trained:
        keys = trained[0]
        metrics = [k for k in keys if k.startswith("train_")] + [k for k in keys
                                                                  if k.startswith("eval_")]
        print(f"{'epoch':>5} {'step':>7} " + " ".join(f"{k:>10}" for k in metrics)
              + f" {'lr':>9} {'samples/s':>9}")
        for h in trained:
            print(f"{h['epoch']:>5} {h['step']:>7} "
                  + " ".join(f"{h.get(k, float('nan')):>10.4f}" for k in metrics)
                  + f" {h['lr']:>9.3g} {h['samples_per_s']:>9.0f}")
    return 0


def rebuild_model(loaded: Loaded):
    """The checkpoint's model, rebuilt from its task and loaded with its weights (CPU).
    Raises TaskError when the task cannot be imported or the weights do not fit it."""
    ref = checkpoint_task(loaded.train_state, loaded.manifest)
    task = load_task(ref)
    try:
        model = task.build_model()
    except Exception as e:  # noqa: BLE001 - the task's own code: report it with its name
        raise TaskError(f"--task {ref.target} {json.dumps(ref.args)}: building the model "
                        f"failed: {type(e).__name__}: {e}") from None
    try:
        load_weights(loaded, model)
    except RuntimeError as e:
        raise TaskError(f"the weights of {loaded.uri} do not fit the model of its task "
                        f"({str(e)[:300]}); is this the same version of the task's code?") from None
    return model


def load_model(uri: str, device: str | torch.device = "cpu",
               storage_options: dict[str, Any] | None = None) -> torch.nn.Module:
    """The model of checkpoint ``uri`` (a checkpoint folder, or the newest valid checkpoint
    below a root; local or s3://), rebuilt from the task it records and loaded with its
    weights, in eval mode on ``device``. The task's code must be importable here. Raises
    InputError: no valid checkpoint there, a task that cannot be imported or built, weights
    that do not fit; StorageError when storage fails."""
    try:
        loaded = load_uri(uri, storage_options)
    except (CorruptCheckpoint, FileNotFoundError) as e:
        raise InputError(f"{uri}: {e}") from None
    try:
        model = rebuild_model(loaded)
    except TaskError as e:
        raise InputError(str(e)) from None
    return model.to(device).eval()


def load_weights(loaded: Loaded, model) -> None:
    """The checkpoint's model weights into the plain ``model`` (one process): a sharded
    checkpoint's shards are assembled whole (its world size does not matter). Raises
    RuntimeError when they do not fit."""
    if loaded.sharded:
        from .runtime.fsdp import load_full_model

        load_full_model(loaded, model)
    else:
        model.load_state_dict(loaded.state["model"])


def cmd_export(args: argparse.Namespace) -> int:
    import torch

    loaded = _load(args)
    # Rebuilt and loaded first: what is exported is known to load into the task's model.
    state = {k: v.detach().cpu().contiguous() for k, v in rebuild_model(loaded).state_dict().items()}
    what = f"{len(state)} tensors"
    out: dict = state
    if args.format == "full":
        from .checkpoint.plain import full_export

        # A sharded checkpoint's optimizer state is in its shards, keyed by parameter name;
        # a plain script's optimizer wants it by index: only a ddp checkpoint's is exported.
        extra = {"optimizer": None if loaded.sharded else loaded.state.get("optimizer"),
                 "scheduler": loaded.state.get("scheduler")}
        out = full_export(state, extra, loaded.train_state)
        what = "the model, " + ", ".join(k for k in ("optimizer_state_dict",
                                                     "scheduler_state_dict") if k in out)
        what += f", epoch {out['epoch']}"
    folder = os.path.dirname(os.path.abspath(args.out))
    os.makedirs(folder, exist_ok=True)
    tmp = args.out + ".tmp"
    torch.save(out, tmp)
    os.replace(tmp, args.out)
    print(f"exported {what} of {loaded.uri} (step {loaded.manifest.step}) to {args.out}")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    loaded = load_uri(args.root, _options(args))
    hist = [h for h in loaded.train_state.get("history", []) if "imported" not in h]
    if not hist:
        print(f"error: {loaded.uri} has no completed epoch to plot yet", file=sys.stderr)
        return 1
    epochs = [h["epoch"] for h in hist]
    names = [k[len("train_"):] for k in hist[0] if k.startswith("train_")]
    fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 4), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        for split, style in (("train", "o-"), ("eval", "s-")):
            key = f"{split}_{name}"
            if key in hist[0]:
                ax.plot(epochs, [h.get(key, float("nan")) for h in hist], style, label=split)
        ax.set(xlabel="epoch", ylabel=name, title=name)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"{loaded.uri} (step {loaded.manifest.step})", fontsize=9)
    fig.tight_layout()
    fig.savefig(args.out, dpi=100)
    print(f"wrote {args.out} ({len(hist)} epochs)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ftrain.ckpt", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--storage-options", default="", help="extra fsspec options as JSON")
    # Accepted after the command too (``ckpt ls ROOT --storage-options ...``).
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--storage-options", default=argparse.SUPPRESS,
                        help="extra fsspec options as JSON (credentials: prefer the AWS_* "
                             "variables or a profile)")
    sub = p.add_subparsers(dest="cmd", required=True)

    def add(name: str, help: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, parents=[common])

    s = add("ls", "list checkpoints with their validity")
    s.add_argument("root")
    s.set_defaults(fn=cmd_ls)
    s = add("verify", "check every file against its manifest; exit 1 if invalid")
    s.add_argument("uri")
    s.set_defaults(fn=cmd_verify)
    s = add("inspect", "show step, epoch, world size, batch, seed, history")
    s.add_argument("uri")
    s.add_argument("--json", action="store_true", help="print JSON")
    s.set_defaults(fn=cmd_inspect)
    s = add("export", "write the model's plain state_dict, or a plain script's full dict")
    s.add_argument("uri")
    s.add_argument("out")
    s.add_argument("--format", choices=("state_dict", "full"), default="state_dict",
                   help="state_dict: the model's weights (default); full: {'epoch', "
                        "'model_state_dict', 'optimizer_state_dict', 'scheduler_state_dict', "
                        "the last epoch's figures}, CPU tensors, for a plain script")
    s.set_defaults(fn=cmd_export)
    s = add("plot", "plot loss and accuracy curves")
    s.add_argument("root")
    s.add_argument("out")
    s.set_defaults(fn=cmd_plot)
    return p


def main(argv: list[str] | None = None) -> int:
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except CorruptCheckpoint as e:
        print(f"error: invalid checkpoint: {e}", file=sys.stderr)
        return 1
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except StorageError as e:
        print(f"error: storage: {e}", file=sys.stderr)
        return 1
    except (TaskError, _BadFlag) as e:
        print(f"error: {e}", file=sys.stderr)
        return exitcodes.INVALID
    except BrokenPipeError:
        # `ckpt inspect URI --json | head`: the reader left; not an error of ours. Point stdout
        # at /dev/null so the interpreter's final flush does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def cli() -> None:
    """Console script ``ftrain-ckpt``."""
    exitcodes.exit_now(main())


if __name__ == "__main__":
    cli()
