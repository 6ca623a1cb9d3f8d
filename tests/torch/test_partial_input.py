"""bnstats.torch._partial_input: a BN subclass whose training forward normalizes part of
its input is measured on the whole input and named in a warning; one that normalizes all of
it is not."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import bnstats.torch as bt
from tests.torch import reference as ref


class _SplitBatchNorm2d(nn.BatchNorm2d):
    """timm's SplitBatchNorm2d (AdvProp, AugMix): in training the layer normalizes the first
    half of each batch itself and the second half with an auxiliary BN; in eval mode all."""

    def __init__(self, num_features: int) -> None:
        super().__init__(num_features)
        self.aux_bn = nn.ModuleList([nn.BatchNorm2d(num_features)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        first, second = x.split(x.shape[0] // 2)
        return torch.cat([super().forward(first), self.aux_bn[0](second)])


class _Logged(nn.BatchNorm2d):
    """A forward of its own that still normalizes the whole input."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * 1.0


def test_a_layer_normalizing_part_of_its_input_in_training_is_named_and_measured_whole():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), _SplitBatchNorm2d(4))
    batches = [torch.randn(8, 3, 6, 6) * 2 + 1 for _ in range(3)]
    with pytest.warns(UserWarning, match=r"'1' \(_SplitBatchNorm2d\) normalizes .*\(4, 4, 4, 4\)"):
        bt.recalibrate(model, batches)
    whole = ref.bn_inputs(model, batches)["1"]
    mean, var = ref.population(whole)
    torch.testing.assert_close(model[1].running_mean, torch.as_tensor(mean, dtype=torch.float32))
    torch.testing.assert_close(model[1].running_var, torch.as_tensor(var, dtype=torch.float32))
    plain = nn.Sequential(nn.Conv2d(3, 4, 3), _Logged(4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bt.recalibrate(plain, batches)
