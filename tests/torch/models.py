"""Small models with batch norm in the shapes real networks use, for the torch tests.

Nothing is downloaded: each builder returns a freshly initialized model whose BN buffers and
affine parameters are randomized (``scramble_batchnorm``) so that folding and recalibration
are exercised with non-trivial values.
"""

from __future__ import annotations

import torch
from torch import nn


def scramble_batchnorm(model: nn.Module, seed: int = 0, tracked: int = 10) -> nn.Module:
    """Give every BN layer random gamma, beta, running_mean, running_var (positive), and
    ``num_batches_tracked = tracked`` (1000: long trained, the EMA's start weighs nothing)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._NormBase):
                if (
                    isinstance(module, nn.modules.lazy.LazyModuleMixin)
                    and module.has_uninitialized_params()
                ):
                    continue
                n = module.num_features
                if module.affine:
                    module.weight.copy_(0.5 + torch.rand(n, generator=gen))
                    module.bias.copy_(torch.randn(n, generator=gen) * 0.3)
                if module.track_running_stats:
                    module.running_mean.copy_(torch.randn(n, generator=gen) * 0.5)
                    module.running_var.copy_(0.5 + torch.rand(n, generator=gen))
                    module.num_batches_tracked.fill_(tracked)
    return model


class BasicBlock(nn.Module):
    """ResNet basic block: conv-BN-ReLU-conv-BN plus a (possibly projected) shortcut."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class TinyResNet(nn.Module):
    """A ResNet-style CNN: stem, two stages of basic blocks (nested), pooled linear head."""

    def __init__(self, in_channels: int = 3, width: int = 8, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU()
        )
        self.stages = nn.Sequential(
            nn.Sequential(BasicBlock(width, width)),
            nn.Sequential(BasicBlock(width, 2 * width, stride=2)),
        )
        self.head = nn.Linear(2 * width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(x))
        return self.head(x.mean(dim=(2, 3)))


class DepthwiseSeparable(nn.Module):
    """MobileNet-style: depthwise conv-BN-ReLU, pointwise conv-BN-ReLU, a grouped conv-BN."""

    def __init__(self, channels: int = 8, classes: int = 5) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, channels, 3, padding=1)
        self.stem_bn = nn.BatchNorm2d(channels)
        self.depthwise = nn.Conv2d(channels, channels, 3, padding=1, groups=channels, bias=False)
        self.dw_bn = nn.BatchNorm2d(channels)
        self.pointwise = nn.Conv2d(channels, 2 * channels, 1)
        self.pw_bn = nn.BatchNorm2d(2 * channels)
        self.grouped = nn.Conv2d(2 * channels, 2 * channels, 3, padding=1, groups=4)
        self.grouped_bn = nn.BatchNorm2d(2 * channels)
        self.head = nn.Linear(2 * channels, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem_bn(self.stem(x)))
        x = torch.relu(self.dw_bn(self.depthwise(x)))
        x = torch.relu(self.pw_bn(self.pointwise(x)))
        x = torch.relu(self.grouped_bn(self.grouped(x)))
        return self.head(x.mean(dim=(2, 3)))


class PreActBlock(nn.Module):
    """Pre-activation residual block: BN-ReLU-conv-BN-ReLU-conv plus identity."""

    def __init__(self, channels: int = 8) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(torch.relu(self.bn1(x)))
        out = self.conv2(torch.relu(self.bn2(out)))
        return out + x


class PreActNet(nn.Module):
    """Stem conv, two pre-activation blocks, BN directly before a 1x1 conv and a linear head
    (the BN -> conv and BN -> linear cases)."""

    def __init__(self, channels: int = 8, classes: int = 4) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, channels, 3, padding=1)
        self.blocks = nn.Sequential(PreActBlock(channels), PreActBlock(channels))
        self.bn_before_1x1 = nn.BatchNorm2d(channels)
        self.conv1x1 = nn.Conv2d(channels, channels, 1)
        self.bn_final = nn.BatchNorm1d(channels)
        self.head = nn.Linear(channels, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(x))
        x = self.conv1x1(self.bn_before_1x1(x))
        return self.head(self.bn_final(x.mean(dim=(2, 3))))


def mlp(sizes: tuple[int, ...] = (16, 32, 24, 5), dropout: float = 0.0) -> nn.Sequential:
    """Linear-BatchNorm1d-ReLU blocks and a linear output."""
    layers: list[nn.Module] = []
    for d_in, d_out in zip(sizes[:-2], sizes[1:-1], strict=True):
        layers += [nn.Linear(d_in, d_out), nn.BatchNorm1d(d_out), nn.ReLU()]
        if dropout:
            layers.append(nn.Dropout(dropout))
    layers.append(nn.Linear(sizes[-2], sizes[-1]))
    return nn.Sequential(*layers)


class Conv1dNet(nn.Module):
    """1-D and 3-D convolutions with BN, and a transposed conv followed by BN."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1d = nn.Conv1d(2, 4, 3, padding=1)
        self.bn1d = nn.BatchNorm1d(4)
        self.up = nn.ConvTranspose1d(4, 6, 4, stride=2, padding=1)
        self.bn_up = nn.BatchNorm1d(6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn_up(self.up(torch.relu(self.bn1d(self.conv1d(x)))))


class Conv3dNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(2, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm3d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn(self.conv(x)))


def image_batches(
    n_batches: int = 4,
    batch_size: int = 8,
    shape: tuple[int, ...] = (3, 12, 12),
    seed: int = 0,
    sizes: list[int] | None = None,
) -> list[torch.Tensor]:
    """Deterministic random inputs; ``sizes`` gives uneven batch sizes."""
    gen = torch.Generator().manual_seed(seed)
    sizes = sizes or [batch_size] * n_batches
    return [torch.randn(n, *shape, generator=gen) * 1.5 + 0.3 for n in sizes]
