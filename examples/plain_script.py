"""A plain PyTorch training script, the shape most people start from: a small CNN, a mean
loss (F.nll_loss), Adadelta, a StepLR stepped once per epoch, a logging interval, a dry run,
and the model saved at the end. It trains on generated 28x28 images (10 classes; no
download). examples/port_of_a_script.py is this script ported to ftrain, and
docs/guide/porting-a-script.md maps one to the other, line by line.

    python examples/plain_script.py --epochs 3 --save-model
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, 1)
        self.conv2 = nn.Conv2d(16, 32, 3, 1)
        self.fc1 = nn.Linear(32 * 12 * 12, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.relu(self.fc1(torch.flatten(x, 1)))
        return F.log_softmax(self.fc2(x), dim=1)


def make_data(n: int, seed: int) -> TensorDataset:
    """``n`` generated images of ten smooth class patterns (the same for every split), each
    blended with another class's and buried in noise; ``seed`` draws the split's samples."""
    patterns = F.interpolate(torch.randn(10, 1, 7, 7, generator=torch.Generator().manual_seed(7)),
                             size=(28, 28), mode="bilinear", align_corners=False)
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 10, (n,), generator=g)
    other = torch.randint(0, 10, (n,), generator=g)
    x = patterns[labels] + 0.8 * patterns[other] + 4.0 * torch.randn(n, 1, 28, 28, generator=g)
    return TensorDataset(x, labels)


def train(args, model, loader, optimizer, epoch: int) -> None:
    model.train()
    for batch_idx, (data, target) in enumerate(loader):
        optimizer.zero_grad()
        output = model(data)
        loss = F.nll_loss(output, target)
        loss.backward()
        optimizer.step()
        if batch_idx % args.log_interval == 0:
            print(f"Train Epoch: {epoch} [{batch_idx * len(data)}/{len(loader.dataset)}]"
                  f"\tLoss: {loss.item():.6f}")
            if args.dry_run:
                break


def test(model, loader) -> float:
    model.eval()
    test_loss, correct = 0.0, 0
    with torch.no_grad():
        for data, target in loader:
            output = model(data)
            test_loss += F.nll_loss(output, target, reduction="sum").item()
            correct += (output.argmax(dim=1) == target).sum().item()
    n = len(loader.dataset)
    print(f"Test set: Average loss: {test_loss / n:.4f}, Accuracy: {correct}/{n} "
          f"({correct / n:.4f})")
    return correct / n


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description="a plain training script")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--test-batch-size", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--lr", type=float, default=1.0)
    parser.add_argument("--gamma", type=float, default=0.7)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--train-size", type=int, default=6000)
    parser.add_argument("--log-interval", type=int, default=20)
    parser.add_argument("--dry-run", action="store_true")
    parser.add_argument("--save-model", action="store_true")
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    train_loader = DataLoader(make_data(args.train_size, seed=0), batch_size=args.batch_size,
                              shuffle=True)
    test_loader = DataLoader(make_data(1000, seed=1), batch_size=args.test_batch_size)
    model = Net()
    optimizer = torch.optim.Adadelta(model.parameters(), lr=args.lr)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=args.gamma)
    accuracy = 0.0
    for epoch in range(1, args.epochs + 1):
        train(args, model, train_loader, optimizer, epoch)
        accuracy = test(model, test_loader)
        scheduler.step()
    if args.save_model:
        torch.save(model.state_dict(), "plain_script.pt")
    return accuracy


if __name__ == "__main__":
    main()
