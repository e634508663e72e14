"""Tasks written the way scripts are: a mean loss, an epoch schedule, ReduceLROnPlateau, and
misspelt declarations that must be refused (tests/test_porting.py)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ftrain import Task


class SumTask(Task):
    """The contract's default: the loss summed over the batch's items."""

    def build_model(self) -> nn.Module:
        return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))

    def datasets(self, ctx):
        g = torch.Generator().manual_seed(ctx.seed)
        x = torch.randn(256, 16, generator=g)
        y = (x[:, :4].argmax(1) + (torch.rand(256, generator=g) < 0.2).long()) % 4
        data = torch.utils.data.TensorDataset(x, y)
        return data, data

    def loss(self, outputs, targets):
        loss = F.cross_entropy(outputs, targets, reduction="sum")
        return loss, {"loss": loss.detach(), "acc": (outputs.argmax(1) == targets).sum()}


class MeanTask(SumTask):
    """The same loss as a script writes it: the mean (PyTorch's default reduction)."""

    loss_reduction = "mean"

    def loss(self, outputs, targets):
        loss = F.cross_entropy(outputs, targets)
        n = len(targets)
        return loss, {"loss": loss.detach() * n, "acc": (outputs.argmax(1) == targets).sum()}


class EpochStepLR(MeanTask):
    """Adadelta and StepLR(step_size=1, gamma=0.7) stepped once per epoch, as the MNIST
    example's script does."""

    scheduler_interval = "epoch"

    def configure_optimizer(self, model, cfg):
        return torch.optim.Adadelta(model.parameters(), lr=1.0)

    def configure_scheduler(self, optimizer, cfg, steps_per_epoch):
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.7)


class Plateau(EpochStepLR):
    """ReduceLROnPlateau on the eval loss; it halves the rate whenever the loss does not
    improve (patience 0), so over a few epochs it really steps."""

    scheduler_metric = "eval_loss"

    def configure_scheduler(self, optimizer, cfg, steps_per_epoch):
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, patience=0, factor=0.5,
                                                          threshold=0.05)


class PlateauEveryStep(Plateau):
    scheduler_interval = "step"


class Misspelt(MeanTask):
    scheduler_intervall = "epoch"  # a typo: would be ignored without the check


class LightningSpelling(SumTask):
    def configure_optimizers(self):  # Lightning's name: never called here
        return torch.optim.SGD([], lr=0.1)


class OwnNames(SumTask):
    """Names of the user's own that resemble no declaration stay allowed."""

    metric = "acc"
    features = 16

    def __init__(self) -> None:
        self.dataset = "mine"
        self.hidden_units = 32


class CodeChanged(EpochStepLR):
    """Its optimizer's rho comes from the code (here: $RHO), as when a user edits the script
    between two runs: a resume must not silently put the checkpoint's value back."""

    def configure_optimizer(self, model, cfg):
        import os

        return torch.optim.Adadelta(model.parameters(), lr=1.0,
                                    rho=float(os.environ.get("RHO", "0.9")))


class PaddedSequences(SumTask):
    """Variable-length sequences padded by the task's own collate_fn: the items cannot be
    stacked, so the default collate (and the on-device gather) cannot make these batches."""

    def build_model(self) -> nn.Module:
        return nn.Sequential(nn.EmbeddingBag(32, 16, mode="mean"), nn.Linear(16, 4))

    def datasets(self, ctx):
        g = torch.Generator().manual_seed(ctx.seed)
        items = []
        for _ in range(256):
            n = int(torch.randint(3, 12, (1,), generator=g))
            seq = torch.randint(0, 32, (n,), generator=g)
            items.append((seq, int(seq[0]) % 4))
        return items, items

    def collate_fn(self, items):
        longest = max(len(seq) for seq, _ in items)
        padded = torch.zeros(len(items), longest, dtype=torch.int64)
        for i, (seq, _) in enumerate(items):
            padded[i, :len(seq)] = seq
        lengths = torch.tensor([len(seq) for seq, _ in items])
        return (padded, lengths), torch.tensor([y for _, y in items])

    def forward(self, model, inputs):
        padded, lengths = inputs
        mask = torch.arange(padded.shape[1]) < lengths[:, None]
        offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)[:-1]])
        bag, linear = model[0], model[1]
        return linear(bag(padded[mask], offsets))


def _naive_port():
    from examples.port_of_a_script import MnistLike

    class NaivePort(MnistLike):
        """The port without its two declarations, as people first write it: the mean loss
        taken for a sum, and the epoch schedule stepped every optimizer step."""

        loss_reduction = "sum"
        scheduler_interval = "step"

    return NaivePort


NaivePort = _naive_port()
