"""More small models for the torch tests: the cases the zoo in models.py does not cover."""

from __future__ import annotations

import torch
from torch import nn


class KeywordNet(nn.Module):
    """Called with keyword arguments, as ``model(**batch)`` does for dict batches."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, image: torch.Tensor, shift: torch.Tensor | None = None) -> torch.Tensor:
        x = image if shift is None else image + shift
        return self.bn(self.conv(x)).mean(dim=(2, 3))


class SharedBatchNorm(nn.Module):
    """One BN module used twice per forward, on two different inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 4)
        self.b = nn.Linear(6, 4)
        self.bn = nn.BatchNorm1d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.a(x)) + self.bn(self.b(x) * 3.0 + 1.0)


class AuxiliaryHead(nn.Module):
    """A BN layer in a head that the forward never calls."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4))
        self.aux = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def lazy_net() -> nn.Sequential:
    """A conv followed by a LazyBatchNorm2d that no forward has initialized."""
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.LazyBatchNorm2d(), nn.ReLU())


def first_layer_bn(channels: int = 3) -> nn.Sequential:
    """BN applied to the raw input, so that the test controls exactly what it sees."""
    return nn.Sequential(nn.BatchNorm1d(channels))
