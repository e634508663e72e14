"""Checkpoint tool, for local folders and s3:// URIs alike.

    python -m src.ckpt ls ROOT                 step, epoch, time, size, valid or why not
    python -m src.ckpt verify URI              exit 1 if anything is invalid
    python -m src.ckpt inspect URI [--json]    step, epoch, world size, batch, seed, history
    python -m src.ckpt export URI OUT.pth      the model's plain state_dict (CPU tensors)
    python -m src.ckpt plot ROOT OUT.png       loss and accuracy curves from the history

URI is a checkpoint root (then the newest valid checkpoint in it) or one step folder.
Extra fsspec options: --storage-options JSON (or FTT_STORAGE_OPTIONS).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
from typing import Any

from .checkpoint import CorruptCheckpoint, Loaded, load_uri, open_uri
from .storage import StorageError


def _options(args: argparse.Namespace) -> dict[str, Any]:
    raw = args.storage_options or os.environ.get("FTT_STORAGE_OPTIONS", "")
    if not raw:
        return {}
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as e:
        raise SystemExit(f"error: --storage-options is not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise SystemExit("error: --storage-options must be a JSON object")
    return value


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
    print(f"{'STEP':>10}  {'EPOCH':>7}  {'TIME':19}  {'SIZE':>10}  STATUS")
    for e in entries:
        m = e.manifest or {}
        epoch = f"{m.get('epoch', '-')}" + (f"+{m['batch_in_epoch']}b" if m.get("batch_in_epoch")
                                            else "")
        size = f"{e.size / 2**20:.1f} MiB" if e.size else "-"
        status = "valid" if e.valid else f"INVALID: {e.reason}"
        print(f"{e.step:>10}  {epoch:>7}  {_when(e.created):19}  {size:>10}  {status}  {e.name}")
    return 0


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
        "step": m["step"],
        "epoch": m["epoch"],
        "batch_in_epoch": m.get("batch_in_epoch", 0),
        "world_size": m.get("world_size"),
        "global_batch_size": m.get("global_batch_size"),
        "seed": m.get("seed"),
        "config_digest": m.get("config_digest"),
        "model_args": m.get("model_args"),
        "created_unix": m.get("created_unix"),
        "versions": m.get("versions"),
        "reason": m.get("reason"),
        "history": ts.get("history", []),
        "config": ts.get("config", {}),
    }


def cmd_inspect(args: argparse.Namespace) -> int:
    info = summary(_load(args))
    if args.json:
        print(json.dumps(info, indent=2, sort_keys=True))
        return 0
    print(f"checkpoint   {info['uri']}")
    print(f"step         {info['step']}  (epochs done {info['epoch']}, batch "
          f"{info['batch_in_epoch']} of the next)")
    print(f"world size   {info['world_size']}   global batch {info['global_batch_size']}   "
          f"seed {info['seed']}")
    print(f"model        {info['model_args']}")
    print(f"written      {_when(info['created_unix'])}  versions {info['versions']}")
    if info["history"]:
        print(f"{'epoch':>5} {'step':>7} {'train_loss':>10} {'train_acc':>9} {'eval_loss':>9} "
              f"{'eval_acc':>8} {'lr':>9} {'samples/s':>9}")
        for h in info["history"]:
            print(f"{h['epoch']:>5} {h['step']:>7} {h['train_loss']:>10.4f} {h['train_acc']:>9.4f} "
                  f"{h['eval_loss']:>9.4f} {h['eval_acc']:>8.4f} {h['lr']:>9.3g} "
                  f"{h['samples_per_s']:>9.0f}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    import torch

    loaded = _load(args)
    state = {k: v.detach().cpu().contiguous() for k, v in loaded.state["model"].items()}
    folder = os.path.dirname(os.path.abspath(args.out))
    os.makedirs(folder, exist_ok=True)
    tmp = args.out + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, args.out)
    print(f"exported {len(state)} tensors of {loaded.uri} (step {loaded.manifest['step']}) to "
          f"{args.out}")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    loaded = load_uri(args.root, _options(args))
    hist = loaded.train_state.get("history", [])
    if not hist:
        print(f"error: {loaded.uri} has no completed epoch to plot yet", file=sys.stderr)
        return 1
    epochs = [h["epoch"] for h in hist]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(epochs, [h["train_loss"] for h in hist], "o-", label="train")
    ax1.plot(epochs, [h["eval_loss"] for h in hist], "s-", label="eval")
    ax1.set(xlabel="epoch", ylabel="loss", title="loss")
    ax2.plot(epochs, [h["train_acc"] for h in hist], "o-", label="train")
    ax2.plot(epochs, [h["eval_acc"] for h in hist], "s-", label="eval")
    ax2.set(xlabel="epoch", ylabel="accuracy", title="accuracy")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"{loaded.uri} (step {loaded.manifest['step']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(args.out, dpi=100)
    print(f"wrote {args.out} ({len(hist)} epochs)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m src.ckpt", description=__doc__,
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
    s = add("export", "write the model's plain state_dict")
    s.add_argument("uri")
    s.add_argument("out")
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
    except BrokenPipeError:
        # `ckpt inspect URI --json | head`: the reader left; not an error of ours. Point stdout
        # at /dev/null so the interpreter's final flush does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def cli() -> None:
    """Console script ``ftrain-ckpt``."""
    sys.exit(main())


if __name__ == "__main__":
    cli()
