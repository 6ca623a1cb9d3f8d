"""Small models for the fold tests: each isolates one case that must fold or must not."""

from __future__ import annotations

import torch
from torch import nn


class Chain(nn.Module):
    """``second(first(x))`` with names the tests can refer to: ``first``, ``second``."""

    def __init__(self, first: nn.Module, second: nn.Module) -> None:
        super().__init__()
        self.first = first
        self.second = second

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x))


class ConvUsedTwice(nn.Module):
    """The conv's output feeds the BN and a residual addition: the conv must not change."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.bn(y) + y


class ConvTwoBNs(nn.Module):
    """One conv feeding two BN layers."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn_a = nn.BatchNorm2d(4)
        self.bn_b = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return torch.cat([self.bn_a(y), self.bn_b(y)], dim=1)


class ReluBetween(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(torch.relu(self.conv(x)))


class SharedConv(nn.Module):
    """The same conv applied twice (tied weights) with a BN after the second call."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(torch.relu(self.conv(x))))


class BothSides(nn.Module):
    """BN -> 1x1 conv -> BN -> BN: all three fold into the one conv."""

    def __init__(self) -> None:
        super().__init__()
        self.bn_in = nn.BatchNorm2d(4)
        self.conv = nn.Conv2d(4, 6, 1, stride=2, groups=2, bias=False)
        self.bn_out = nn.BatchNorm2d(6)
        self.bn_again = nn.BatchNorm2d(6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn_again(self.bn_out(self.conv(self.bn_in(x))))


class Untraceable(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.conv(x))
        if y.sum() > 0:
            return y
        return -y


class StandardizedConv(nn.Conv2d):
    """A conv whose forward normalizes its weight: folding into ``weight`` would be wrong."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        w = (w - w.mean(dim=(1, 2, 3), keepdim=True)) / (w.std(dim=(1, 2, 3), keepdim=True) + 1e-5)
        return self._conv_forward(x, w, self.bias)


def bn_before(conv: nn.Module, channels: int) -> Chain:
    """``conv(BN(x))``."""
    return Chain(nn.BatchNorm2d(channels), conv)


def linear_over_length() -> Chain:
    """Linear on the LAST dim of (N, 6, 10) -> BatchNorm1d(6) on dim 1: the shapes fit, the
    channels do not."""
    return Chain(nn.Linear(10, 6), nn.BatchNorm1d(6))


def bn_then_linear_over_length() -> Chain:
    """BatchNorm1d(6) on dim 1 of (N, 6, 10) -> Linear on the last dim."""
    return Chain(nn.BatchNorm1d(6), nn.Linear(10, 3))


class RepVggBlock(nn.Module):
    """RepVGG's training-time block (Ding et al. 2021): ``relu(BN(conv3x3(x)) +
    BN(conv1x1(x)) + BN(x))``; the identity BN is computed first, as in timm's block."""

    def __init__(self, channels: int = 4, stride: int = 1, padding: int = 1) -> None:
        super().__init__()
        self.identity = nn.BatchNorm2d(channels)
        self.conv_kxk = nn.Conv2d(channels, channels, 3, stride, padding, bias=False)
        self.bn_kxk = nn.BatchNorm2d(channels)
        self.conv_1x1 = nn.Conv2d(channels, channels, 1, stride, bias=False)
        self.bn_1x1 = nn.BatchNorm2d(channels)
        self.drop_path = nn.Identity()
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = self.identity(x)
        y = self.bn_1x1(self.conv_1x1(x)) + self.bn_kxk(self.conv_kxk(x))
        return self.act(self.drop_path(y) + identity)
