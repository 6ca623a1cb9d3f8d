"""The shared helpers: finding BN layers, restoring the model."""

from __future__ import annotations

from collections import namedtuple

import pytest
import torch
from torch import nn

import bnstats
import bnstats.torch as bt
from bnstats.torch._layers import PreservedState, find_batchnorm_layers
from tests.torch import reference as ref
from tests.torch import zoo

Pair = namedtuple("Pair", ["x", "y"])


def test_finds_every_kind_of_batchnorm_by_qualified_name():
    model = nn.Sequential(
        nn.Sequential(nn.BatchNorm1d(2), nn.SyncBatchNorm(2)),
        nn.LazyBatchNorm2d(),
        bt.BatchNorm3d(2, estimator=bnstats.CumulativeAverage()),
        nn.BatchNorm1d(2, track_running_stats=False),
        nn.InstanceNorm2d(2, track_running_stats=True),
        nn.LayerNorm(2),
    )
    model.alias = model[0][0]
    assert list(find_batchnorm_layers(model)) == ["0.0", "0.1", "1", "2"]
    with pytest.raises(TypeError, match="nn.Module"):
        find_batchnorm_layers(lambda x: x)


def test_preserved_state_restores_modes_momentum_buffers_and_removes_hooks_on_error():
    model = zoo.build("resnet")
    layers = find_batchnorm_layers(model)
    saved, flags = ref.snapshot(model), ref.modes(model)
    with pytest.raises(RuntimeError), PreservedState(model, layers) as state:
        model.eval()
        layers["stem.1"].momentum = None
        state.add_hook(layers["stem.1"].register_forward_hook(lambda *a: None))
        with torch.no_grad():
            layers["stem.1"].running_mean.add_(1.0)
            layers["stem.1"].num_batches_tracked.add_(5)
        raise RuntimeError("midway")
    assert ref.same_state(model, saved) and ref.modes(model) == flags
    assert layers["stem.1"].momentum == 0.1 and not layers["stem.1"]._forward_hooks
