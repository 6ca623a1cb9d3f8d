"""Models for the ONNX tests: a small conv net, a deep chain where float32 rounding exceeds
1e-5 of the output, and a residual net as torch's exporter meets them."""

from __future__ import annotations

import torch
from torch import nn


class Net(nn.Module):
    """BN after a conv, before a conv (no padding: exact), and after a linear layer."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8, eps=1e-3)
        self.bn2 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 6, 3)
        self.fc = nn.Linear(6, 5)
        self.bn3 = nn.BatchNorm1d(5, momentum=0.2)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.conv2(self.bn2(x)).mean(dim=(2, 3))
        return self.bn3(self.fc(x))


def trained(model: nn.Module, x: torch.Tensor, batches: int = 5) -> nn.Module:
    """``model`` after ``batches`` training-mode forwards of shifted noise like ``x``."""
    torch.manual_seed(0)
    model.train()
    with torch.no_grad():
        for _ in range(batches):
            model(x * 2 + 1 + torch.randn_like(x))
    return model


class DeepChain(nn.Sequential):
    """``depth`` x (Linear -> BatchNorm1d), each linear layer's bias shifted by ``offset``, its
    BN calibrated on three training-mode batches: every BN subtracts a mean 10x the spread it
    divides by, so float32 rounding grows layer by layer (about 4e-5 of the output at depth
    40, in torch and in onnxruntime alike)."""

    def __init__(self, depth: int = 40, width: int = 16, offset: float = 10.0) -> None:
        torch.manual_seed(0)
        layers: list[nn.Module] = []
        for _ in range(depth):
            layers += [nn.Linear(width, width), nn.BatchNorm1d(width, momentum=None)]
        super().__init__(*layers)
        with torch.no_grad():
            for layer in self:
                if isinstance(layer, nn.Linear):
                    layer.bias.add_(offset)
            self.train()
            for _ in range(3):
                super().forward(torch.randn(64, width))
        self.eval()


class ResNetish(nn.Module):
    """A stem, one residual block and a classifier: every BN follows a conv, as in resnet18."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.conv3 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        y = torch.relu(self.bn2(self.conv2(x)))
        x = torch.relu(x + self.bn3(self.conv3(y)))
        return self.fc(x.mean(dim=(2, 3)))


class TwoHeads(nn.Module):
    """A large head (logits around 1e3) and a small one (around 1e-3, a box regression) on a
    shared body; the small head's BN comes before its linear layer (``bt.fold`` folds it there,
    ``BN -> layer``), and ``small`` is the last layer (its parameters are the model's last)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()
        )
        self.big = nn.Linear(8, 10)
        self.bn = nn.BatchNorm1d(8)
        self.small = nn.Linear(8, 2)

    def forward(self, x):
        features = self.body(x)
        return self.big(features) * 1000.0, self.small(self.bn(features)) * 0.001


class Branching(nn.Module):
    """conv -> BN behind a data-dependent branch: torch.fx cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        if x.mean() > -100:  # always taken; torch.fx cannot know
            x = x * 1.0
        return self.bn(self.conv(x))
