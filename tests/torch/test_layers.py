"""The shared helpers: finding BN layers, feeding batches, restoring the model."""

from __future__ import annotations

from collections import namedtuple

import pytest
import torch
from torch import nn

import bnstats
import bnstats.torch as bt
from bnstats.torch._layers import (
    PreservedState,
    find_batchnorm_layers,
    iterate_batches,
    move_to_device,
)
from bnstats.torch.options import PassOptions
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


def test_the_crossing_batch_is_cut_in_every_structure():
    x, y = torch.arange(20.0).reshape(10, 2), torch.arange(10)
    batches = [(x, y), {"x": x, "y": y, "meta": "keep"}, Pair(x, y), [x, torch.tensor(3.0)]]
    for batch in batches:
        ((cut, size),) = list(iterate_batches([batch], max_samples=4))
        assert size == 4
        leaves = list(cut.values()) if isinstance(cut, dict) else list(cut)
        assert type(cut) is type(batch)
        assert torch.equal(leaves[0], x[:4])
        if isinstance(cut, dict):
            assert torch.equal(cut["y"], y[:4]) and cut["meta"] == "keep"
        elif isinstance(cut, list):
            assert leaves[1].shape == ()  # a 0-d tensor has no samples to cut
        else:
            assert torch.equal(leaves[1], y[:4])


def test_max_samples_needs_tensors_and_a_positive_count():
    with pytest.raises(TypeError, match="max_samples needs"):
        list(iterate_batches([object()], max_samples=3))
    with pytest.raises(ValueError, match="positive"):
        PassOptions(max_samples=0)
    assert [size for _, size in iterate_batches([object()])] == [None]


def test_tensors_move_to_the_device_wherever_they_are_nested():
    batch = {"a": (torch.ones(2), [torch.zeros(1)]), "b": Pair(torch.ones(1), 3), "c": "text"}
    moved = move_to_device(batch, torch.device("meta"))
    assert moved["a"][0].is_meta and moved["a"][1][0].is_meta and moved["b"].x.is_meta
    assert isinstance(moved["b"], Pair) and moved["b"].y == 3 and moved["c"] == "text"
    assert move_to_device(batch, None) is batch


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
