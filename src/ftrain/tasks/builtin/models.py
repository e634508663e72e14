"""Model builders by name. ``model_args`` (saved in every checkpoint) rebuilds the same model."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class SmallCNN(nn.Module):
    """Two conv blocks with BatchNorm, then two linear layers."""

    def __init__(self, in_channels: int = 1, image_size: int = 28, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
            nn.MaxPool2d(2),
        )
        side = image_size // 4
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(64 * side * side, 128), nn.ReLU(),
                                        nn.Linear(128, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class MLP(nn.Module):
    """Flatten, ``depth`` hidden layers of ``width``; make it wide to get a large state."""

    def __init__(self, in_features: int, width: int, depth: int, num_classes: int) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        prev = in_features
        for _ in range(depth):
            layers += [nn.Linear(prev, width), nn.ReLU()]
            prev = width
        layers.append(nn.Linear(prev, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def model_args(name: str, in_channels: int, image_size: int, num_classes: int, width: int,
               depth: int) -> dict[str, Any]:
    args: dict[str, Any] = {"name": name, "in_channels": in_channels, "image_size": image_size,
                            "num_classes": num_classes}
    if name == "mlp":
        args.update(width=width, depth=depth)
    return args


def build_model(args: dict[str, Any]) -> nn.Module:
    """Build from ``model_args``; raises ValueError naming --model for an unknown name."""
    name = args["name"]
    if name == "cnn":
        return SmallCNN(args["in_channels"], args["image_size"], args["num_classes"])
    if name == "mlp":
        feats = args["in_channels"] * args["image_size"] ** 2
        return MLP(feats, args["width"], args["depth"], args["num_classes"])
    if name == "resnet18":
        from torchvision.models import resnet18

        m = resnet18(num_classes=args["num_classes"])
        # CIFAR-sized input: a 3x3 stem without the max-pool keeps the 32x32 resolution useful.
        m.conv1 = nn.Conv2d(args["in_channels"], 64, 3, 1, 1, bias=False)
        m.maxpool = nn.Identity()
        return m
    raise ValueError(f"--model: unknown model {name!r}")
