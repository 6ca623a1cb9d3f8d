"""The model zoo with matching inputs: name -> (build a scrambled model, make batches)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from tests.torch.models import (
    Conv1dNet,
    Conv3dNet,
    DepthwiseSeparable,
    PreActNet,
    TinyResNet,
    image_batches,
    mlp,
    scramble_batchnorm,
)

UNEVEN = [7, 3, 12, 5]

_SHAPES: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "resnet": (TinyResNet, (3, 10, 10)),
    "depthwise": (DepthwiseSeparable, (3, 8, 8)),
    "preact": (PreActNet, (3, 8, 8)),
    "mlp": (mlp, (16,)),
    "conv1d": (Conv1dNet, (2, 9)),
    "conv3d": (Conv3dNet, (2, 4, 5, 5)),
}

NAMES = sorted(_SHAPES)


def build(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return scramble_batchnorm(_SHAPES[name][0](), seed=seed)


def batches(name: str, sizes: list[int] | None = None, seed: int = 1) -> list[torch.Tensor]:
    return image_batches(sizes=sizes or UNEVEN, shape=_SHAPES[name][1], seed=seed)
