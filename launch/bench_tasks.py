"""Tasks the benchmarks train (``--task launch.bench_tasks:TinyMLP``), and the plain loops they
are compared with: the same model, data, optimizer and schedule, written as a user's script."""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn

from ftrain import Task


def tiny_data(seed: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(size, 16, generator=g)
    return x, x[:, :4].argmax(1)


class TinyMLP(Task):
    """An MLP 16-32-4 (676 parameters) on generated data: a step costs almost nothing, so what
    the training loop adds shows (issue 21's first row)."""

    def __init__(self, size: int = 16384) -> None:
        self.size = size

    def build_model(self) -> nn.Module:
        return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))

    def datasets(self, ctx):
        x, y = tiny_data(ctx.seed, self.size)
        data = torch.utils.data.TensorDataset(x, y)
        return data, torch.utils.data.TensorDataset(x[:256], y[:256])

    def loss(self, outputs, targets):
        loss = F.cross_entropy(outputs, targets, reduction="sum")
        return loss, {"loss": loss.detach(), "acc": (outputs.argmax(1) == targets).sum()}


def tiny_plain_rate(size: int = 16384, batch: int = 64, epochs: int = 2, seed: int = 0,
                    lr: float = 0.05, device: str = "cpu", feed: str = "indexed") -> float:
    """The plain loop over TinyMLP's model and data, on the tensors themselves (shuffled by a
    permutation each epoch), with the job's default optimizer and schedule (SGD, momentum 0.9,
    weight decay 1e-4, cosine per step) and the task's own loss, its metric sums added up on
    the device as a script would: samples/s over the last epoch. ``feed="loader"``: the
    batches come from a plain shuffled ``DataLoader`` over a ``TensorDataset`` of the CPU
    tensors instead, each copied to the device."""
    dev = torch.device(device)
    task = TinyMLP(size)
    x, y = tiny_data(seed, size)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch,
                                         shuffle=True, drop_last=True)
    x, y = x.to(dev), y.to(dev)
    torch.manual_seed(seed)
    model = task.build_model().to(dev)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
    steps = size // batch
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps)
    rate = 0.0
    for _epoch in range(epochs):
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        order = torch.randperm(size, device=dev)
        totals = torch.zeros(2, dtype=torch.float64, device=dev)
        batches = ((xb.to(dev), yb.to(dev)) for xb, yb in loader) if feed == "loader" else (
            (x[order[b * batch:(b + 1) * batch]], y[order[b * batch:(b + 1) * batch]])
            for b in range(steps))
        for xb, yb in batches:
            loss, sums = task.loss(model(xb), yb)
            (loss / batch).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            sched.step()
            totals += torch.stack([sums["loss"].double(), sums["acc"].double()])
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        rate = steps * batch / (time.perf_counter() - t0)
    return rate
