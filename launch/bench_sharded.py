"""Sharded checkpoint cost (``--parallel fsdp``): each measure with its reference, same run.

    torchrun --nproc_per_node 2 -m launch.bench_sharded [--mib 384] [--dir /tmp/ftrain-bench-sharded]

Per rank: the loop's stall per save (``get_state_dict`` + the snapshot of this rank's shards
into reused host buffers) against the snapshot floor (a copy of the same local tensors into
preallocated buffers). Aggregate: the background persist of a sharded checkpoint (every rank
writes its shard; rank 0 commits) in MB/s over all shards, against ONE writer of the same
total bytes (raw write + fsync from rank 0 while the others wait), and the sharded load
(every rank reads its chunks) against a raw read of the same bytes. The model: two square
Linear layers + AdamW (parameters x 3 = state), sharded over the world.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import time

import torch
import torch.distributed as dist
from torch import nn

from ftrain import Task
from ftrain.checkpoint import (
    Checkpointer,
    CheckpointStore,
    ShardedCheckpointer,
    step_dirname,
)
from ftrain.checkpoint.staging import HostBuffers
from ftrain.runtime.distributed import DistInfo, choose_device
from ftrain.storage import Storage


class _Square(Task):
    def __init__(self, width: int) -> None:
        self.width = width

    def build_model(self) -> nn.Module:
        return nn.Sequential(nn.Linear(self.width, self.width), nn.Linear(self.width, self.width))


def _median(xs: list[float]) -> float:
    return statistics.median(xs)


def _raw_write(path: str, data: memoryview) -> float:
    t0 = time.perf_counter()
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    took = time.perf_counter() - t0
    os.unlink(path)
    return took


def _split(total: int, parts: int) -> list[int]:
    """``total`` bytes as ``parts`` sizes that are multiples of 4 (float32 tensors)."""
    each = total // parts // 4 * 4
    return [each] * (parts - 1) + [total - each * (parts - 1)]


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from ftrain.runtime.fsdp import build_model, load_sharded

    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mib", type=float, default=384, help="approximate state size (MiB)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--dir", default="/tmp/ftrain-bench-sharded")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    device = choose_device(args.device, int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    info = DistInfo(rank, world, rank, device, "gloo")
    width = int((args.mib * 2**20 / 4 / 3 / 2) ** 0.5)
    task = _Square(width)
    model = build_model(task, 0, info)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(8, width, device=device)).sum().backward()
    opt.step()
    opt.zero_grad()
    if rank == 0:
        shutil.rmtree(args.dir, ignore_errors=True)
        os.makedirs(args.dir)
    dist.barrier()
    store = CheckpointStore(Storage(args.dir))
    group = dist.new_group(backend="gloo")
    saver = ShardedCheckpointer(store, keep_last=args.repeats + 2, orphan_grace_s=3600,
                                group=group, is_main=rank == 0, world_size=world)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    # The floor: this rank's local shards copied into preallocated host buffers.
    local = {k: v.to_local() if hasattr(v, "to_local") else v
             for k, v in {**dict(model.state_dict()),
                          **{f"o{i}{n}": t for i, s in enumerate(opt.state.values())
                             for n, t in s.items()}}.items()}
    snap = HostBuffers()
    snap.copy(local)
    floors, stalls, persists = [], [], []
    for _ in range(args.repeats):
        sync()
        t0 = time.perf_counter()
        snap.copy(local)
        sync()
        floors.append(time.perf_counter() - t0)
    for i in range(1, args.repeats + 1):
        dist.barrier()
        t0 = time.perf_counter()
        msd, osd = get_state_dict(model, opt)
        saver.save(i, {"sharded": {"model": msd, "optimizer": osd}, "small": {}},
                   {"epoch": 0, "step": i}, {"epoch": 0}, blocking=False)
        stalls.append(time.perf_counter() - t0)
        assert saver.wait() is True
        persists.append(time.perf_counter() - t0)
    local_bytes = sum(t.numel() * t.element_size() for t in local.values())
    manifest = store.read_manifest(step_dirname(args.repeats))
    total = sum(manifest.files[f].size for f in manifest.shards)

    # One writer of the same total bytes: raw write + fsync from rank 0, and the ddp layout's
    # own persist (rank 0's Checkpointer: torch.save streamed, hashed, committed) of a plain
    # state of the same size.
    dist.barrier()
    one = one_ckpt = 0.0
    if rank == 0:
        blob = torch.ones(total, dtype=torch.uint8).numpy()
        one = _median([_raw_write(os.path.join(args.dir, "one-writer.bin"), blob.data)
                       for _ in range(args.repeats)])
        del blob
        plain = {"t": [torch.ones(n // 4) for n in _split(total, 8)]}
        single = Checkpointer(CheckpointStore(Storage(os.path.join(args.dir, "single"))),
                              keep_last=args.repeats + 2, orphan_grace_s=3600)
        times = []
        for i in range(1, args.repeats + 1):
            t0 = time.perf_counter()
            single.save(i, plain, {"epoch": 0, "step": i}, {"epoch": 0}, blocking=True)
            times.append(time.perf_counter() - t0)
        one_ckpt = _median(times)
        single.close()
        del plain
    dist.barrier()
    # Every rank writes its shard's bytes raw at once: what the disk gives parallel writers.
    blob = torch.ones(local_bytes, dtype=torch.uint8).numpy()
    times = []
    for _ in range(args.repeats):
        dist.barrier()
        t0 = time.perf_counter()
        _raw_write(os.path.join(args.dir, f"par-{rank}.bin"), blob.data)
        dist.barrier()
        times.append(time.perf_counter() - t0)
    parallel_raw = _median(times)
    del blob

    # Load: every rank its chunks, against a raw read of the same bytes (page cache warm).
    loads = []
    loaded = store.load(step_dirname(args.repeats))
    for _ in range(args.repeats):
        dist.barrier()
        t0 = time.perf_counter()
        load_sharded(loaded, model, opt)
        sync()
        dist.barrier()
        loads.append(time.perf_counter() - t0)
    raw = 0.0
    if rank == 0:
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            for f in manifest.shards:
                with open(os.path.join(args.dir, step_dirname(args.repeats), f), "rb") as fh:
                    fh.read()
            times.append(time.perf_counter() - t0)
        raw = _median(times)

    stall, floor, persist = _median(stalls), _median(floors), _median(persists)
    rows = [None] * world
    dist.all_gather_object(rows, (rank, local_bytes, stall, floor))
    if rank == 0:
        mb = total / 1e6
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else \
            platform.processor() or "cpu"
        print(f"device {device} ({name}), torch {torch.__version__}, world {world}, state "
              f"{total / 2**20:.0f} MiB in {len(manifest.shards)} shards, medians of "
              f"{args.repeats}")
        for r, nbytes, s, f in rows:
            print(f"rank {r}: shard {nbytes / 2**20:.0f} MiB, stall per save {s * 1e3:.1f} ms, "
                  f"snapshot floor {f * 1e3:.1f} ms ({s / max(f, 1e-9):.2f}x)")
        print(f"sharded persist (snapshot to commit, all ranks): {persist:.3f} s = "
              f"{mb / persist:.0f} MB/s")
        print(f"  one writer, same bytes: raw write + fsync {one:.3f} s = {mb / one:.0f} MB/s "
              f"(sharded/raw {one / persist:.2f}x); the ddp layout's Checkpointer "
              f"{one_ckpt:.3f} s = {mb / one_ckpt:.0f} MB/s (sharded/ddp "
              f"{one_ckpt / persist:.2f}x)")
        print(f"  {world} raw writers at once, one shard's bytes each: {parallel_raw:.3f} s = "
              f"{mb / parallel_raw:.0f} MB/s (sharded/that {parallel_raw / persist:.2f}x)")
        print(f"sharded load (all ranks, resharding path): {_median(loads):.3f} s; raw read of "
              f"the shards by one process: {raw:.3f} s ({_median(loads) / max(raw, 1e-9):.2f}x)")
    saver.close()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
