"""Models for the eval-mode tests: a deep MLP chain, a deep conv chain, a residual CNN, a
densenet-like CNN."""

from __future__ import annotations

import copy
import functools

import torch
from torch import nn

import bnstats.torch as bt
from tests.torch.models import scramble_batchnorm


def mlp_chain(depth: int = 30, width: int = 32, inputs: int = 12) -> nn.Sequential:
    """``depth`` blocks of BatchNorm1d, ReLU, Linear after a first Linear: depth BN levels."""
    layers: list[nn.Module] = [nn.Linear(inputs, width)]
    for _ in range(depth):
        layers += [nn.BatchNorm1d(width), nn.ReLU(), nn.Linear(width, width)]
    return scramble_batchnorm(nn.Sequential(*layers), seed=1)


def conv_chain(depth: int = 30, channels: int = 8) -> nn.Sequential:
    """``depth`` blocks of BatchNorm2d, ReLU, 3x3 Conv2d after a first Conv2d: depth BN levels."""
    layers: list[nn.Module] = [nn.Conv2d(3, channels, 3, padding=1)]
    for _ in range(depth):
        layers += [nn.BatchNorm2d(channels), nn.ReLU(), nn.Conv2d(channels, channels, 3, padding=1)]
    return nn.Sequential(*layers)


class _Residual(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


class ResidualCNN(nn.Module):
    """A stem conv-BN and ``blocks`` residual blocks of two conv-BN each."""

    def __init__(self, channels: int = 8, blocks: int = 6) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, channels, 3, padding=1)
        self.bn = nn.BatchNorm2d(channels)
        self.blocks = nn.Sequential(*[_Residual(channels) for _ in range(blocks)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(torch.relu(self.bn(self.stem(x))))


class DenseCNN(nn.Module):
    """DenseNet-like: each step concatenates conv(relu(BN(x))) to x, a final BN over all."""

    def __init__(self, channels: int = 8, growth: int = 4, steps: int = 8) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, channels, 3, padding=1)
        self.norms, self.convs = nn.ModuleList(), nn.ModuleList()
        for _ in range(steps):
            self.norms.append(nn.BatchNorm2d(channels))
            self.convs.append(nn.Conv2d(channels, growth, 3, padding=1))
            channels += growth
        self.final = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for norm, conv in zip(self.norms, self.convs, strict=True):
            x = torch.cat([x, conv(torch.relu(norm(x)))], dim=1)
        return self.final(x)


def build(name: str) -> nn.Module:
    torch.manual_seed(0)
    if name == "chain":
        return mlp_chain()
    models = {"residual": ResidualCNN, "dense": DenseCNN, "convchain": conv_chain}
    return scramble_batchnorm(models[name](), seed=1)


def batches(name: str, count: int = 10, size: int = 16) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    shape = (12,) if name == "chain" else (3, 8, 8)
    return [torch.randn(size, *shape, generator=gen) * 1.5 + 0.4 for _ in range(count)]


def level_by_level(name: str, count: int = 10, size: int = 16) -> bt.Recalibration:
    """``bt.recalibrate_report(build(name), batches(name, count, size), mode="eval_exact")``,
    the level-by-level reference many tests compare with: computed once per test run (one
    pass per depth level: 31 on the conv chain) and handed out as a copy each test may
    change."""
    return copy.deepcopy(_level_by_level(name, count, size))


@functools.cache
def _level_by_level(name: str, count: int, size: int) -> bt.Recalibration:
    return bt.recalibrate_report(build(name), batches(name, count, size), mode="eval_exact")


class Unsized:
    """Batches that can be gone over again but have no length (the data's size is known only
    after a pass)."""

    def __init__(self, batches: list[torch.Tensor]) -> None:
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)
