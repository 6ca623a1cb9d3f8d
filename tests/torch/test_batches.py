"""How a batch reaches the model (bnstats.torch._batches): cut at max_samples in every
structure, moved to the device wherever its tensors are nested."""

from __future__ import annotations

from collections import namedtuple

import pytest
import torch

from bnstats.torch._batches import iterate_batches, move_to_device
from bnstats.torch.options import PassOptions

Pair = namedtuple("Pair", ["x", "y"])


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
