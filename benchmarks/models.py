"""The models the benchmarks run: a ResNet-18-shaped CNN (with and without BN), a small CNN
and an MLP for the 8x8 digits.

The ResNet follows He et al. (2016), ResNet-18: a 7x7 stride-2 stem with max pooling, four
stages of two basic blocks (widths 64/128/256/512, strides 1/2/2/2, 1x1 projection
shortcuts where the shape changes), global average pooling, a linear head; 20 BN layers.
At 64x64 input the stages see 16x16, 8x8, 4x4 and 2x2 maps. ``batchnorm=False`` builds the
same architecture without BN, its convolutions with a bias instead: what a folded model
is at best.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

RESNET18_WIDTHS = (64, 128, 256, 512)


def _conv(c_in: int, c_out: int, kernel: int, stride: int, batchnorm: bool) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, bias=not batchnorm)


def _norm(channels: int, batchnorm: bool) -> nn.Module | None:
    return nn.BatchNorm2d(channels) if batchnorm else None


def _apply(norm: nn.Module | None, x: torch.Tensor) -> torch.Tensor:
    return x if norm is None else norm(x)


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus the shortcut (a 1x1 conv-BN if the shape changes)."""

    def __init__(self, c_in: int, c_out: int, stride: int, batchnorm: bool = True) -> None:
        super().__init__()
        self.conv1 = _conv(c_in, c_out, 3, stride, batchnorm)
        self.bn1 = _norm(c_out, batchnorm)
        self.conv2 = _conv(c_out, c_out, 3, 1, batchnorm)
        self.bn2 = _norm(c_out, batchnorm)
        self.project = stride != 1 or c_in != c_out
        if self.project:
            self.shortcut_conv = _conv(c_in, c_out, 1, stride, batchnorm)
            self.shortcut_bn = _norm(c_out, batchnorm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(_apply(self.bn1, self.conv1(x)))
        out = _apply(self.bn2, self.conv2(out))
        if self.project:
            x = _apply(self.shortcut_bn, self.shortcut_conv(x))
        return torch.relu(out + x)


class ResNet18Shaped(nn.Module):
    """ResNet-18's layout for small images; ``widths`` scales it (``--quick`` uses narrower)."""

    def __init__(
        self,
        widths: Sequence[int] = RESNET18_WIDTHS,
        classes: int = 10,
        batchnorm: bool = True,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        self.stem_conv = _conv(in_channels, widths[0], 7, 2, batchnorm)
        self.stem_bn = _norm(widths[0], batchnorm)
        self.pool = nn.MaxPool2d(3, 2, 1)
        blocks = []
        c_in = widths[0]
        for i, width in enumerate(widths):
            stride = 1 if i == 0 else 2
            blocks += [
                BasicBlock(c_in, width, stride, batchnorm),
                BasicBlock(width, width, 1, batchnorm),
            ]
            c_in = width
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(c_in, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(torch.relu(_apply(self.stem_bn, self.stem_conv(x))))
        x = self.blocks(x)
        return self.head(x.mean(dim=(2, 3)))


def count_batchnorm(model: nn.Module) -> int:
    """BN modules (any subclass of torch's ``_BatchNorm``) left in ``model``."""
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def randomize_batchnorm(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BN layer random gamma, beta and running statistics, as after training
    (a freshly built layer's gamma = 1, beta = 0, mean 0, var 1 would make folding trivial)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                n = module.num_features
                module.weight.copy_(0.5 + torch.rand(n, generator=gen))
                module.bias.copy_(0.2 * torch.randn(n, generator=gen))
                module.running_mean.copy_(0.3 * torch.randn(n, generator=gen))
                module.running_var.copy_(0.5 + torch.rand(n, generator=gen))
    return model


def image_batches(
    n_batches: int, batch_size: int, size: int, channels: int = 3, seed: int = 0
) -> list[torch.Tensor]:
    """Deterministic float32 images ``(batch_size, channels, size, size)``, mean 0.3, std 1.5."""
    gen = torch.Generator().manual_seed(seed)
    shape = (batch_size, channels, size, size)
    return [torch.randn(shape, generator=gen) * 1.5 + 0.3 for _ in range(n_batches)]


class DigitsCNN(nn.Module):
    """A small CNN for the 1x8x8 digits: three conv-BN-ReLU (8x8, 4x4, 4x4), pooled, linear."""

    def __init__(self, width: int = 16, classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, 1, 1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, 2, 1, bias=False),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(),
            nn.Conv2d(2 * width, 2 * width, 3, 1, 1, bias=False),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(),
        )
        self.head = nn.Linear(2 * width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x.view(-1, 1, 8, 8)).mean(dim=(2, 3)))


def digits_mlp(sizes: Sequence[int] = (64, 128, 64, 10)) -> nn.Sequential:
    """The engine's ``Network.mlp(sizes)`` in torch: Linear (no bias) - BatchNorm1d - ReLU per
    hidden layer, then a Linear with bias."""
    layers: list[nn.Module] = []
    for d_in, d_out in zip(sizes[:-2], sizes[1:-1], strict=True):
        layers += [nn.Linear(d_in, d_out, bias=False), nn.BatchNorm1d(d_out), nn.ReLU()]
    layers.append(nn.Linear(sizes[-2], sizes[-1]))
    return nn.Sequential(*layers)
