"""Checkpoint cost benchmark: each measure printed with its reference, measured in the same run.

    python -m launch.bench_checkpoint [--mib 384] [--device auto] [--dir /tmp/bench] [--repeats 3]
    python -m launch.bench_checkpoint --references CHECKPOINT_FOLDER   (launch.bench's S1, S2)

P3  loop stall per save            vs the snapshot floor (copy into preallocated host buffers)
P4  loop stall per save            vs synchronous torch.save + fsync of the same state
P5  background persist throughput  vs raw write + fsync of the same bytes
P7  load (verified) on resume      vs raw read of the checkpoint's bytes
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import time

import torch

from ftrain.checkpoint import Checkpointer, CheckpointStore, step_dirname
from ftrain.checkpoint.staging import HostBuffers
from ftrain.runtime.distributed import choose_device
from ftrain.storage import Storage


def _median(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _write_fsync(path: str, write) -> None:
    with open(path, "wb") as fh:
        write(fh)
        fh.flush()
        os.fsync(fh.fileno())


def references(folder: str, work: str, repeats: int) -> dict[str, float]:
    """What a save of checkpoint ``folder``'s state costs a user without ftrain: a synchronous
    ``torch.save`` + fsync of the state, and a raw write + fsync of its state file's bytes."""
    import json

    root, name = os.path.split(folder.rstrip("/"))
    store = CheckpointStore(Storage(root))
    loaded = store.load(name)
    state = {k: v for k, v in loaded.state.items()}
    blob = bytes(store.storage.read(f"{name}/{loaded.manifest.state_file}"))
    os.makedirs(work, exist_ok=True)
    sync_s = _median(lambda: _write_fsync(os.path.join(work, "sync.pt"),
                                          lambda fh: torch.save(state, fh)), repeats)
    raw_s = _median(lambda: _write_fsync(os.path.join(work, "raw.bin"),
                                         lambda fh: fh.write(blob)), repeats)
    shutil.rmtree(work, ignore_errors=True)
    out = {"sync_save_s": sync_s, "raw_write_s": raw_s, "mib": len(blob) / 2**20}
    print(json.dumps(out))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mib", type=float, default=384, help="approximate state size (MiB)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--dir", default="/tmp/ftrain-bench")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--references", metavar="FOLDER", default="",
                   help="only time a sync torch.save + fsync and a raw write + fsync of this "
                        "checkpoint's state; print them as JSON")
    args = p.parse_args(argv)
    if args.references:
        references(args.references, args.dir, args.repeats)
        return 0
    device = choose_device(args.device, 0)
    # Two square Linear layers + AdamW (2 moments): params x 3 = state.
    width = int((args.mib * 2**20 / 4 / 3 / 2) ** 0.5)
    model = torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.Linear(width, width)).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(8, width, device=device)).sum().backward()
    opt.step()
    state = {"model": model.state_dict(), "optimizer": opt.state_dict()}
    nbytes = sum(t.numel() * t.element_size() for t in model.state_dict().values()) * 3
    shutil.rmtree(args.dir, ignore_errors=True)
    os.makedirs(args.dir)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(f"device {device} ({name}), torch {torch.__version__}, state {nbytes / 2**20:.0f} MiB")

    # Snapshot floor: copy into preallocated (pinned on GPU) host buffers.
    snap = HostBuffers()
    snap.copy(state)
    _sync(device)

    def floor():
        snap.copy(state)
        _sync(device)

    t_floor = _median(floor, args.repeats)

    # Synchronous torch.save + fsync.
    path = os.path.join(args.dir, "sync.pt")

    def sync_save():
        with open(path, "wb") as fh:
            torch.save(state, fh)
            fh.flush()
            os.fsync(fh.fileno())

    t_sync = _median(sync_save, args.repeats)
    size = os.path.getsize(path)

    # Raw write + fsync of the same bytes, and raw read.
    blob = open(path, "rb").read()

    def raw_write():
        with open(os.path.join(args.dir, "raw.bin"), "wb") as fh:
            fh.write(blob)
            fh.flush()
            os.fsync(fh.fileno())

    t_raw_write = _median(raw_write, args.repeats)
    t_raw_read = _median(lambda: open(path, "rb").read(), args.repeats)

    # Ours: the loop's stall, and the background persist time.
    store = CheckpointStore(Storage(os.path.join(args.dir, "ckpt")))
    ck = Checkpointer(store, keep_last=2, orphan_grace_s=3600)
    stalls, persists = [], []
    for i in range(args.repeats + 1):
        t0 = time.perf_counter()
        ck.save(i + 1, state, {"epoch": 0, "step": i + 1}, {"epoch": 0})
        stall = time.perf_counter() - t0
        ck.wait()
        persist = time.perf_counter() - t0
        if i:  # the first save allocates the buffers
            stalls.append(stall)
            persists.append(persist - stall)
    t_stall, t_persist = statistics.median(stalls), statistics.median(persists)
    latest = step_dirname(args.repeats + 1)
    t_load = _median(lambda: store.load(latest), args.repeats)
    ck.close()

    rows = [
        ("P3", "stall per save / snapshot floor", t_stall, t_floor, "<= 1.5"),
        ("P4", "stall per save / sync torch.save+fsync", t_stall, t_sync, "<= 0.15"),
        ("P5", "raw write+fsync / background persist (throughput ratio)", t_raw_write, t_persist,
         ">= 0.8"),
        ("P7", "verified load / raw read", t_load, t_raw_read, "<= 1.5"),
    ]
    print(f"{'':3} {'measure':58} {'ours s':>8} {'ref s':>8} {'ratio':>7}  target")
    for tag, what, ours, ref, target in rows:
        print(f"{tag:3} {what:58} {ours:8.3f} {ref:8.3f} {ours / ref:7.2f}  {target}")
    print(f"(checkpoint file {size / 2**20:.0f} MiB; medians of {args.repeats})")
    shutil.rmtree(args.dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
