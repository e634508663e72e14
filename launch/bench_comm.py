"""DDP's gradient exchange, all-reduce against ftrain's rank-order all-gather (issue 21):
which of them resumes bitwise at 3 ranks, and what each costs a step.

``python -m launch.bench_comm`` spawns 3 gloo processes on this machine. For each exchange it
trains an MLP (2.4 M parameters, 1 MiB DDP buckets) 6 steps without a break, then again with a
"resume" after step 3: a new model, optimizer and DDP wrapper (a new Reducer, as a restarted
process builds) loaded from the state of step 3. It prints whether the two end bitwise equal,
and the steps/s of each exchange over 30 more steps.

- ``allreduce``: DDP's own. In torch >= 2.12 a Reducer's first step puts every gradient in one
  bucket and re-packs them after it (``compute_bucket_size_limits``); the ring sums each
  element in an order that depends on where it falls in its bucket, so the resumed run's first
  step sums differently from the uninterrupted run's same step.
- ``allreduce-pinned``: ftrain's ``StepExchange`` on CPU (runtime/exchange.py): the same
  all-reduce, after one backward pass whose gradients are thrown away (``pin_layout``), so
  that every counted step, in every process, runs on the re-packed layout; with each step's
  metric sums (two) in the all-gather of their own, as the Trainer sends them.
- ``gather``: ``StepExchange(model, "gather")`` (``--deterministic`` on GPUs): each bucket
  all-gathered, summed in rank order; gradients only (ftrain's CPU exchange carried the sums
  in the same gather until 2026-12-05, at no extra collective).
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
MODES = ("allreduce", "allreduce-pinned", "gather")


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(256, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(),
                         nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10))


def _batch(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(32, 256, generator=g), torch.randint(0, 10, (32,), generator=g)


def _wrap(model: nn.Module, mode: str) -> nn.parallel.DistributedDataParallel:
    sys.path[:0] = [str(ROOT / "src")]
    from ftrain.runtime.exchange import StepExchange

    ddp = nn.parallel.DistributedDataParallel(model, bucket_cap_mb=1)
    if mode == "allreduce":
        return ddp
    hook = StepExchange(model, "gather" if mode == "gather" else "allreduce")
    ddp.register_comm_hook(None, hook.hook)
    ddp.exchange = hook if mode != "gather" else None  # sends a row of metric sums a step
    x, y = _batch(-1, dist.get_rank())
    # the Trainer's call before the first step (a no-op for the gather)
    hook.pin_layout(ddp, lambda: nn.functional.cross_entropy(ddp(x), y))
    return ddp


def _steps(ddp: nn.Module, opt: torch.optim.Optimizer, first: int, n: int) -> None:
    for s in range(first, first + n):
        x, y = _batch(s, dist.get_rank())
        exchange = getattr(ddp, "exchange", None)
        if exchange is not None:  # as the Trainer does: two metric sums with the gradients
            exchange.send(torch.zeros(2, dtype=torch.float64))
        nn.functional.cross_entropy(ddp(x), y).backward()
        if exchange is not None:
            exchange.completed()
        opt.step()
        opt.zero_grad(set_to_none=True)


def _new(state: dict | None = None) -> tuple[nn.Module, torch.optim.Optimizer]:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
    return model, opt


def _worker(rank: int, world: int, port: int, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    for mode in MODES:
        model, opt = _new()
        _steps(_wrap(model, mode), opt, 0, 6)
        straight = [p.detach().clone() for p in model.parameters()]

        model, opt = _new()
        _steps(_wrap(model, mode), opt, 0, 3)
        state = {"model": {k: v.clone() for k, v in model.state_dict().items()},
                 "opt": opt.state_dict()}
        model, opt = _new(state)  # the restarted process
        ddp = _wrap(model, mode)
        _steps(ddp, opt, 3, 3)
        bitwise = all(torch.equal(a, b) for a, b in zip(straight, model.parameters(),
                                                           strict=True))
        _steps(ddp, opt, 6, 5)  # warm
        dist.barrier()
        t0 = time.perf_counter()
        _steps(ddp, opt, 11, 30)
        dist.barrier()
        rate = 30 / (time.perf_counter() - t0)
        if rank == 0:
            out[mode] = (bitwise, rate)
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--world", type=int, default=3)
    args = p.parse_args(argv)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = mp.Manager().dict()
    mp.spawn(_worker, args=(args.world, port, out), nprocs=args.world)
    print(f"{args.world} gloo ranks on this machine, MLP of "
          f"{sum(p.numel() for p in _model().parameters()) / 1e6:.1f} M parameters, 1 MiB "
          f"buckets, torch {torch.__version__}\n")
    print("| exchange | resumed run bitwise equal | steps/s |")
    print("|---|---|---|")
    for mode in MODES:
        bitwise, rate = out[mode]
        print(f"| {mode} | {'yes' if bitwise else 'NO'} | {rate:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
