"""DDP's gradient exchange, the ftrain way: a mean whose bits a resume reproduces, and with it
what a survivor needs to checkpoint a step without the rank that died in the next one.

Registered as DDP's comm hook on CPU and under --deterministic. Two ways to a mean that a
resume reproduces bit for bit at any world size:

- ``"allreduce"`` (CPU): each bucket all-reduced (a sum, then divided by the world size). A
  ring sums each element in an order set by where the element falls in its bucket, and DDP
  re-packs its buckets after the first backward pass of every process: a resumed run's first
  step would sum in another order than the uninterrupted run's same step. ``pin_layout``
  runs one backward pass before the first step (its gradients thrown away), so that every
  step of every process runs on the re-packed layout (``python -m launch.bench_comm``).
- ``"gather"`` (GPU, --deterministic): each bucket all-gathered and summed in rank order,
  independent of the layout; costs the world size times the bucket in memory and traffic.

On CPU the step's last bucket also carries, in an all-gather of its own beside the
gradients' (raw bytes: a copy, no arithmetic touches them):

- this rank's metric sums of the step (float64), so every rank holds every rank's sums and
  the epoch's running sums need no collective to be checkpointed;
- this rank's buffers (BatchNorm's running statistics); rank 0's are copied into every
  rank's, as DDP's ``broadcast_buffers`` would at the next forward pass, so DDP is built
  without it.

So once a step's gradients have arrived, every rank holds the whole state of that step that
rank 0 would checkpoint: parameters, optimizer, buffers, metric sums; the RNG states are
derived (core/rng.py). A failure in a later collective loses nothing of it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist


class StepExchange:
    """DDP comm hook (``ddp.register_comm_hook(None, exchange.hook)``); ``send`` before the
    backward pass that all-reduces, ``rows`` after it."""

    def __init__(self, model: torch.nn.Module, reduce: str = "allreduce") -> None:
        self.reduce = reduce  # "allreduce" (with pin_layout) or "gather"
        self.buffers = [b for b in model.buffers()]
        self._row: torch.Tensor | None = None  # this step's sums, to send
        self.rows: torch.Tensor | None = None  # (world, metrics): the newest step's, received
        self._received: torch.Tensor | None = None  # rank 0's buffers as bytes, just received
        self._completed: torch.Tensor | None = None  # those of the newest completed step

    def send(self, row: torch.Tensor) -> None:
        """This rank's metric sums of the step (float64, on the device); goes with the
        step's last gradient bucket."""
        self._row = row
        self.rows = None

    def completed(self) -> torch.Tensor | None:
        """The step's optimizer step is done: its buffers are the newest completed step's.
        Returns the step's rows (every rank's metric sums)."""
        self._completed = self._received
        return self.rows

    def restore_buffers(self) -> None:
        """Put back rank 0's buffers of the newest completed step: a forward pass in flight
        (the step a peer died in) has updated them since."""
        if self._completed is not None:
            self._load_buffers(self._completed)

    def _load_buffers(self, raw: torch.Tensor) -> None:
        """The buffers from their bytes, in ``self.buffers``' order."""
        offset = 0
        with torch.no_grad():
            for b in self.buffers:
                n = b.numel() * b.element_size()
                b.copy_(raw[offset:offset + n].clone().view(b.dtype).view(b.shape))
                offset += n

    def _payload(self) -> torch.Tensor:
        """The row and the buffers, as bytes."""
        parts = [self._row.reshape(-1).view(torch.uint8)]
        parts += [b.detach().reshape(-1).view(torch.uint8) for b in self.buffers]
        return torch.cat(parts)

    def _receive(self, raw: torch.Tensor, k: int) -> None:
        """``raw``: (world, bytes) as sent by every rank; ``k`` metric sums each."""
        self.rows = raw[:, :8 * k].contiguous().view(torch.float64)
        self._received = raw[0, 8 * k:]  # rank 0's buffers
        if dist.get_rank() != 0:
            self._load_buffers(self._received)

    def pin_layout(self, ddp: torch.nn.Module, forward_loss: Callable[[], torch.Tensor]) -> None:
        """Before the first step of this process: one backward pass through ``ddp`` whose
        gradients, buffer updates and metric sums are thrown away; DDP re-packs its buckets at
        the next forward pass, so every counted step, in every process, all-reduces the same
        layout. ``forward_loss``: the first step's forward pass and loss. Collective."""
        if self.reduce != "allreduce":
            return
        saved = [b.detach().clone() for b in self.buffers]
        try:
            forward_loss().backward()
        finally:
            for p in ddp.parameters():
                p.grad = None
            with torch.no_grad():
                for b, v in zip(self.buffers, saved, strict=True):
                    b.copy_(v)

    def hook(self, process_group, bucket):  # -> Future[Tensor]; DDP rejects a str annotation
        group = process_group if process_group is not None else dist.group.WORLD
        world = dist.get_world_size(group)
        grad = bucket.buffer()
        if self.reduce == "gather":
            return self._gathered_mean(grad, group, world)
        futures = [dist.all_reduce(grad, group=group, async_op=True).get_future()]
        carry = bucket.is_last() and self._row is not None
        if carry:
            payload = self._payload()
            k, self._row = self._row.numel(), None
            flat = torch.empty(world * payload.numel(), dtype=torch.uint8, device=grad.device)
            futures.append(dist.all_gather_into_tensor(flat, payload, group=group,
                                                       async_op=True).get_future())

        def mean(fut) -> torch.Tensor:
            # A peer that died mid-exchange fails a future: raise here, or the callback would
            # hand DDP half-received bytes as the step's gradients and buffers.
            for f in fut.wait():
                f.wait()
            if carry:
                self._receive(flat.view(world, -1), k)
            return grad.div_(world)

        return torch.futures.collect_all(futures).then(mean)

    def _gathered_mean(self, grad: torch.Tensor, group, world: int):
        """The bucket's mean in rank order (no metric sums or buffers carried)."""
        n = grad.numel()
        flat = torch.empty(world * n, dtype=grad.dtype, device=grad.device)
        work = dist.all_gather_into_tensor(flat, grad.reshape(-1), group=group, async_op=True)
        rows = flat.view(world, n)

        def mean(fut) -> torch.Tensor:
            fut.wait()
            total = rows[0].clone()
            for r in range(1, world):
                total.add_(rows[r])
            return total.div_(world).reshape(grad.shape)

        return work.get_future().then(mean)
