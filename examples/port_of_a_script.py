"""examples/plain_script.py ported to ftrain, keeping its lines: the same Net and data, its
mean loss (F.nll_loss), Adadelta, and StepLR stepped once per epoch. Every guarantee then
holds for it: exact resume, preemption, any world size. docs/guide/porting-a-script.md maps
the script to this file line by line.

    torchrun --nproc_per_node=2 -m ftrain.train --task examples.port_of_a_script:MnistLike \\
        --batch-size 64 --epochs 3 --log-every-steps 20
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from examples.plain_script import Net, make_data
from ftrain import Config, Task, TaskContext


class MnistLike(Task):
    loss_reduction = "mean"  # F.nll_loss as the script calls it: the mean over the batch
    scheduler_interval = "epoch"  # the script steps StepLR once per epoch

    def __init__(self, gamma: float = 0.7, train_size: int = 6000) -> None:
        self.gamma, self.train_size = gamma, train_size

    def build_model(self) -> nn.Module:
        return Net()

    def datasets(self, ctx: TaskContext):
        return make_data(self.train_size, seed=0), make_data(1000, seed=1)

    def loss(self, outputs, targets):
        loss = F.nll_loss(outputs, targets)  # the script's line, unchanged
        n = len(targets)
        return loss, {"loss": loss.detach() * n,  # metric sums stay sums
                      "acc": (outputs.argmax(dim=1) == targets).sum()}

    def configure_optimizer(self, model: nn.Module, cfg: Config) -> torch.optim.Optimizer:
        return torch.optim.Adadelta(model.parameters(), lr=cfg.lr)

    def configure_scheduler(self, optimizer, cfg: Config, steps_per_epoch: int):
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=self.gamma)
