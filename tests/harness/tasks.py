"""A minimal user task for tests that write checkpoints by hand (tests/harness/s3.py)."""

from __future__ import annotations

import torch
from torch import nn

from ftrain import Task


class ToyTask(Task):
    def build_model(self) -> nn.Module:
        return nn.Sequential(nn.Linear(16, 8), nn.BatchNorm1d(8), nn.Linear(8, 4))

    def datasets(self, ctx):
        g = torch.Generator().manual_seed(ctx.seed)
        x = torch.randn(64, 16, generator=g)
        y = torch.randint(0, 4, (64,), generator=g)
        data = torch.utils.data.TensorDataset(x, y)
        return data, data

    def loss(self, outputs, targets):
        loss = nn.functional.cross_entropy(outputs, targets, reduction="sum")
        return loss, {"loss": loss.detach(), "acc": (outputs.argmax(1) == targets).sum()}


class FileTask(ToyTask):
    """Reads its data from ``--data-dir``/data.pt: the test changes the file between runs."""

    def datasets(self, ctx):
        import os

        x, y = torch.load(os.path.join(ctx.data_dir, "data.pt"), weights_only=True)
        data = torch.utils.data.TensorDataset(x, y)
        return data, data


def write_data(folder, seed: int) -> None:
    import os

    g = torch.Generator().manual_seed(seed)
    os.makedirs(folder, exist_ok=True)
    torch.save((torch.randn(64, 16, generator=g), torch.randint(0, 4, (64,), generator=g)),
               os.path.join(folder, "data.pt"))


class DropoutTask(ToyTask):
    """Randomness in the forward pass: exact resume needs each rank's RNG states."""

    def build_model(self) -> nn.Module:
        return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Dropout(0.5), nn.Linear(32, 4))


class PidTask(ToyTask):
    """Appends the pid of every process that fetches an item (train or eval) to
    ``--data-dir``/pids: which processes served the data."""

    def datasets(self, ctx):
        train, test = super().datasets(ctx)
        return PidItems(train, ctx.data_dir), PidItems(test, ctx.data_dir)


class PidItems(torch.utils.data.Dataset):
    def __init__(self, base, folder: str) -> None:
        self.base, self.folder = base, folder

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        import os

        with open(os.path.join(self.folder, "pids"), "a") as fh:
            fh.write(f"{os.getpid()}\n")
        return self.base[i]


class BuggyTask(ToyTask):
    """A bug in the task's loss: the run must exit 1 with the traceback."""

    def loss(self, outputs, targets):
        raise ZeroDivisionError("a bug in the task's loss")


class BareLossTask(ToyTask):
    """A script's loss function ported as it is: the loss alone, no metric sums."""

    def loss(self, outputs, targets):
        return nn.functional.cross_entropy(outputs, targets, reduction="sum")


class ListSumsTask(ToyTask):
    """Metric sums in a list instead of a dict of names."""

    def loss(self, outputs, targets):
        loss = nn.functional.cross_entropy(outputs, targets, reduction="sum")
        return loss, [loss.detach()]


class ShiftingSumsTask(ToyTask):
    """Another metric name from the second batch on."""

    def __init__(self) -> None:
        self.calls = 0

    def loss(self, outputs, targets):
        self.calls += 1
        loss = nn.functional.cross_entropy(outputs, targets, reduction="sum")
        return loss, {"loss" if self.calls == 1 else "xent": loss.detach()}


class ChangedLossTask(ToyTask):
    """Trains as ToyTask; with ``ChangedLossTask.bare`` set (a class attribute, as the task's
    code edited after training) its loss returns the loss alone."""

    bare = False

    def loss(self, outputs, targets):
        loss, sums = super().loss(outputs, targets)
        return loss if type(self).bare else (loss, sums)


class TypeErrorTask(ToyTask):
    """A bug inside the loss that raises TypeError: the task's own error, not a shape error."""

    def loss(self, outputs, targets):
        return nn.functional.cross_entropy(outputs, "not a tensor", reduction="sum")


class SignalTask(ToyTask):
    """Sends ``SignalTask.signum`` to its own process after the ``SignalTask.at``-th optimizer
    step of each run (0: never): a Ctrl-C or a preemption that lands at a known step inside
    ``ftrain.fit``. Class attributes, not arguments: the arguments are compared on resume."""

    signum = 2
    at = 0

    def __init__(self) -> None:
        self.steps = 0

    def after_step(self, model) -> None:
        import os

        self.steps += 1
        if self.steps == type(self).at:
            os.kill(os.getpid(), type(self).signum)
