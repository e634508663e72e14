"""DDP's gradient exchange (runtime/exchange.py) on three spawned gloo ranks, each training on
its own data: once a step's gradients have arrived, every rank holds every rank's metric sums
of that step and rank 0's BatchNorm statistics, bit for bit, and the same parameters. That is
what lets a survivor checkpoint the newest step of a peer that died in the next one."""

from __future__ import annotations

import multiprocessing

import torch

from tests.harness.checkpoints import cut_and_resume
from tests.harness.processes import rank_then_exit_now

WORLD = 3


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(),
                               torch.nn.Linear(8, 2))


def _train_on_ranks(rank: int, store: str, out: str) -> None:
    import torch.distributed as dist

    from ftrain.runtime.exchange import StepExchange
    from ftrain.train import _no_forward_buffer_sync

    dist.init_process_group("gloo", store=dist.FileStore(store, WORLD), rank=rank,
                            world_size=WORLD)
    model = _model()
    exchange = StepExchange(model)
    ddp = torch.nn.parallel.DistributedDataParallel(model, bucket_cap_mb=0.0001,  # buckets
                                                    **_no_forward_buffer_sync())
    ddp.register_comm_hook(None, exchange.hook)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    steps = []
    for step in range(3):
        gen = torch.Generator().manual_seed(100 * step + rank)  # this rank's own batch
        x, y = torch.randn(4, 6, generator=gen) * (rank + 1), torch.randint(0, 2, (4,),
                                                                             generator=gen)
        loss = torch.nn.functional.cross_entropy(ddp(x), y, reduction="sum")
        own_buffers = [b.clone() for b in model.buffers()]  # after this rank's forward
        row = torch.stack([loss.detach().double(), torch.tensor(float(rank + step),
                                                                 dtype=torch.float64)])
        exchange.send(row)
        loss.backward()
        opt.step()
        opt.zero_grad()
        steps.append({"row": row, "rows": exchange.rows.clone(), "own_buffers": own_buffers,
                      "buffers": [b.clone() for b in model.buffers()],
                      "params": [p.detach().clone() for p in model.parameters()]})
    torch.save(steps, f"{out}.{rank}")
    dist.destroy_process_group()


def test_every_rank_holds_every_ranks_sums_and_rank0s_buffers_after_each_step(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    out = tmp_path / "result"
    procs = [ctx.Process(target=rank_then_exit_now,
                         args=(_train_on_ranks, r, str(tmp_path / "store"), str(out)))
             for r in range(WORLD)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(180)
    assert [p.exitcode for p in procs] == [0] * WORLD
    ranks = [torch.load(f"{out}.{r}", weights_only=True) for r in range(WORLD)]
    for step in range(3):
        sent = torch.stack([ranks[r][step]["row"] for r in range(WORLD)])
        rank0 = ranks[0][step]
        # The ranks' own statistics differ (each normalised its own batch) ...
        assert not torch.equal(rank0["own_buffers"][0], ranks[1][step]["own_buffers"][0])
        for r in range(WORLD):
            got = ranks[r][step]
            assert torch.equal(got["rows"], sent)  # every rank's sums, in rank order
            # ... and after the exchange every rank holds rank 0's, as DDP's broadcast of
            # buffers at the next forward pass would give it.
            for mine, want in zip(got["buffers"], rank0["own_buffers"], strict=True):
                assert torch.equal(mine, want)
            for mine, want in zip(got["params"], rank0["params"], strict=True):
                assert torch.equal(mine, want)


def _die_in_backward(rank: int, store: str, out: str) -> None:
    import os

    import torch.distributed as dist

    from ftrain.runtime.distributed import peer_failure
    from ftrain.runtime.exchange import StepExchange
    from ftrain.train import _no_forward_buffer_sync

    dist.init_process_group("gloo", store=dist.FileStore(store, 2), rank=rank, world_size=2)
    model = _model()
    exchange = StepExchange(model)
    ddp = torch.nn.parallel.DistributedDataParallel(model, **_no_forward_buffer_sync())
    ddp.register_comm_hook(None, exchange.hook)
    loss = ddp(torch.randn(4, 6)).sum()
    if rank == 1:
        os._exit(0)  # dies before its gradients leave: the peer's gather fails
    exchange.send(torch.zeros(2, dtype=torch.float64))
    try:
        loss.backward()
        outcome = "completed"
    except RuntimeError as e:
        outcome = "peer failure" if peer_failure(e) else f"other: {e}"
    torch.save({"outcome": outcome, "rows": exchange.rows}, out)
    os._exit(0)  # the group is broken: no teardown


def test_a_gather_that_a_dead_peer_fails_raises_instead_of_training_on_half_received_bytes(
        tmp_path):
    """Rank 1 dies before its gradients leave. Rank 0's backward pass must fail as a peer
    failure (the survivor then checkpoints the previous step), not complete with the
    half-received buffer as the step's mean gradient and metric sums."""
    ctx = multiprocessing.get_context("spawn")
    out = tmp_path / "rank0.pt"
    procs = [ctx.Process(target=_die_in_backward, args=(r, str(tmp_path / "store"), str(out)))
             for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(180)
    got = torch.load(out, weights_only=True)
    assert got["outcome"] == "peer failure", got
    assert got["rows"] is None  # no sums taken from the broken gather


def test_three_ranks_cut_and_resumed_end_bitwise_equal_on_the_pinned_all_reduce(tmp_path):
    """At 3 ranks the order of the ring's sums follows DDP's bucket layout, which DDP re-packs
    after the first backward pass of every process; the Trainer pins it before the first step
    (runtime/exchange.py), so a run cut at step 4 and rerun ends bitwise equal to an
    uninterrupted one. (Without the pin the default CNN's weights differ: its 1.7 MB gradient
    is one bucket in a process's first step, two after.)"""
    cut_and_resume(["--synthetic-train-size", "960", "--synthetic-test-size", "96",
                    "--batch-size", "96", "--epochs", "1", "--log-every-steps", "0",
                    "--save-every-seconds", "0"], tmp_path, cut_at=4, nproc=3)
