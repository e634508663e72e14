"""DDP's gradient exchange, the ftrain way: the mean in rank order, and with it what a survivor
needs to checkpoint a step without the rank that died in the next one.

Registered as DDP's comm hook on CPU and under --deterministic. Each gradient bucket is
all-gathered and summed in rank order (identical bits on every rank whatever DDP's bucket
layout: a resume that re-packs the buckets sums in the same order). The step's last bucket
also carries, as raw bytes in the same all-gather (a copy: no arithmetic touches them):

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

import torch
import torch.distributed as dist


class StepExchange:
    """DDP comm hook (``ddp.register_comm_hook(None, exchange.hook)``); ``send`` before the
    backward pass that all-reduces, ``rows`` after it."""

    def __init__(self, model: torch.nn.Module) -> None:
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

    def _payload(self, dtype: torch.dtype) -> tuple[torch.Tensor, int]:
        """The row and the buffers as bytes, padded to whole elements of ``dtype``."""
        parts = [self._row.reshape(-1).view(torch.uint8)]
        parts += [b.detach().reshape(-1).view(torch.uint8) for b in self.buffers]
        raw = torch.cat(parts)
        size = torch.empty((), dtype=dtype).element_size()
        pad = -raw.numel() % size
        if pad:
            raw = torch.cat([raw, raw.new_zeros(pad)])
        return raw.view(dtype), raw.numel() - pad

    def _receive(self, payload: torch.Tensor, nbytes: int, k: int) -> None:
        """``payload``: (world, elements) as sent by every rank; ``k`` metric sums each."""
        raw = payload.contiguous().view(torch.uint8)[:, :nbytes]
        self.rows = raw[:, :8 * k].contiguous().view(torch.float64)
        self._received = raw[0, 8 * k:]  # rank 0's buffers
        if dist.get_rank() != 0:
            self._load_buffers(self._received)

    def hook(self, process_group, bucket):  # -> Future[Tensor]; DDP rejects a str annotation
        group = process_group if process_group is not None else dist.group.WORLD
        world = dist.get_world_size(group)
        grad = bucket.buffer()
        n = grad.numel()
        send = grad.reshape(-1)
        carry = bucket.is_last() and self._row is not None
        nbytes = k = 0
        if carry:
            payload, nbytes = self._payload(grad.dtype)
            send = torch.cat([send, payload])
            k, self._row = self._row.numel(), None
        m = send.numel()
        flat = torch.empty(world * m, dtype=grad.dtype, device=grad.device)
        work = dist.all_gather_into_tensor(flat, send, group=group, async_op=True)
        rows = flat.view(world, m)

        def mean(fut) -> torch.Tensor:
            # A peer that died mid-gather fails the future: raise here, or the callback would
            # hand DDP half-received bytes as the step's gradients and buffers.
            fut.wait()
            total = rows[0, :n].clone()
            for r in range(1, world):
                total.add_(rows[r, :n])
            if carry:
                self._receive(rows[:, n:], nbytes, k)
            return total.div_(world).reshape(grad.shape)

        return work.get_future().then(mean)
