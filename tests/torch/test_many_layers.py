"""The end of a pass for many layers at once gives what the layer-by-layer path gives."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import bnstats.torch as bt
from bnstats.torch import _layer_pass
from bnstats.torch._layer_pass import LayerPass, flush_together
from bnstats.torch._many_layers import merge_rows, relative_errors

SIZES = (3, 8, 1, 5)


def filled_layers(batches: int, bad: dict[int, int] | None = None) -> list[LayerPass]:
    """Layers of SIZES channels whose kernel rows hold random moments of ``batches`` batches of
    uneven counts (different per layer); ``bad[layer] = batch``: a NaN there."""
    gen = torch.Generator().manual_seed(3)
    layers = []
    for index, channels in enumerate(SIZES):
        layer = nn.BatchNorm1d(channels)
        layer.running_mean.normal_(generator=gen)
        moments = LayerPass(f"layer{index}", layer)
        for batch in range(batches):
            count = 2 + int(torch.randint(0, 50, (1,), generator=gen)) * (index + 1)
            mean, var = moments.kernel_slot(batch, count)
            mean.copy_(torch.randn(channels, generator=gen) * 3 + 1)
            var.copy_(torch.rand(channels, generator=gen) * 2)
            if (bad or {}).get(index) == batch:
                var[0] = math.nan
        layers.append(moments)
    return layers


def state(moments: LayerPass) -> list[torch.Tensor]:
    population, spread = moments.population, moments.spread.values
    return [
        torch.as_tensor(population.count),
        population.mean,
        population.m2,
        spread.mean,
        spread.m2,
        moments._verdict,
    ]


@pytest.mark.parametrize("bad", [None, {1: 2, 3: 0}])
@pytest.mark.parametrize("twice", [False, True])
def test_merging_rows_together_matches_layer_by_layer(bad, twice):
    together = filled_layers(7, bad)
    apart = copy.deepcopy(together)
    merge_rows(together)
    for moments in apart:
        moments.flush()
    if twice:  # a second group merges into the first (more than one block of rows)
        more = filled_layers(4)
        for moments, extra in zip(together, more, strict=True):
            moments._block = extra._block
            moments._slot_indices, moments._slot_counts = extra._slot_indices, extra._slot_counts
        apart_more = copy.deepcopy(more)
        for moments, extra in zip(apart, apart_more, strict=True):
            moments._block = extra._block
            moments._slot_indices, moments._slot_counts = extra._slot_indices, extra._slot_counts
        merge_rows(together)
        for moments in apart:
            moments.flush()
    for ours, theirs in zip(together, apart, strict=True):
        assert ours.population.num_batches_tracked == theirs.population.num_batches_tracked
        for got, want in zip(state(ours), state(theirs), strict=True):
            torch.testing.assert_close(got, want, rtol=1e-14, atol=1e-12)
    if bad:  # the NaN batches were left out of their layers only
        assert state(together[1])[-1].tolist() == [2.0, 1.0]
        assert state(together[3])[-1].tolist() == [0.0, 1.0]
        assert state(together[0])[-1].tolist() == [math.inf, 0.0]


def test_relative_errors_of_many_layers_match_each_layers_own():
    layers = filled_layers(9, {2: 4})
    flush_together(layers)
    finite = [9, 9, 8, 9]
    together = relative_errors(layers, finite)
    each = torch.stack([m.relative_error(b) for m, b in zip(layers, finite, strict=True)])
    torch.testing.assert_close(together, each, rtol=1e-12, atol=0)


def test_a_layer_with_fewer_than_two_batches_has_an_infinite_relative_error():
    layers = filled_layers(3)
    flush_together(layers)
    errors = relative_errors(layers, [3, 1, 3, 0])
    assert math.isinf(errors[1]) and math.isinf(errors[3])
    assert math.isfinite(errors[0]) and math.isfinite(errors[2])


def test_layers_of_other_batches_or_dtypes_merge_apart():
    layers = filled_layers(5)
    odd = LayerPass("odd", nn.BatchNorm1d(2).double())
    for batch in range(5):
        mean, var = odd.kernel_slot(batch, 10)
        mean.fill_(float(batch))
        var.fill_(1.0)
    shifted = filled_layers(4)[0]
    shifted._slot_indices = [index + 1 for index in shifted._slot_indices]
    everything = [*layers, odd, shifted]
    flush_together(everything)
    assert odd.population.mean.tolist() == [2.0, 2.0]
    assert all(m.rows_key() is None and not m._slot_indices for m in everything)


def test_a_group_too_wide_for_the_cache_merges_in_parts_to_the_same_numbers(monkeypatch):
    """flush_together merges at most _MERGED_VALUES batches x channels at once: cut after
    every layer or two, and with a wider layer alone, the numbers are those of one merge."""
    whole = filled_layers(7, {1: 2})
    parts = copy.deepcopy(whole)
    merge_rows(whole)
    merged: list[list[str]] = []
    monkeypatch.setattr(_layer_pass, "_MERGED_VALUES", 7 * 9)  # SIZES (3, 8, 1, 5): 3, 8+1, 5
    monkeypatch.setattr(
        _layer_pass,
        "merge_rows",
        lambda group: merged.append([m.name for m in group]) or merge_rows(group),
    )
    flush_together(parts)
    assert merged == [["layer1", "layer2"]]  # layer0 and layer3 alone: their own flush
    for ours, theirs in zip(parts, whole, strict=True):
        for got, want in zip(state(ours), state(theirs), strict=True):
            torch.testing.assert_close(got, want, rtol=1e-14, atol=1e-12)


def test_a_pass_without_precision_pools_the_same_populations_and_no_spread():
    """recalibrate and adapt, which report no standard errors, skip the spread: the same
    populations, bit for bit; the spread empty; relative errors infinite, not made up."""
    precise = filled_layers(6, {2: 1})
    plain = copy.deepcopy(precise)
    for moments in plain:
        moments.precise = False
    flush_together(precise)
    flush_together(plain)
    for ours, theirs in zip(plain, precise, strict=True):
        kept = [0, 1, 2, 5]  # count, mean, m2, verdict (3 and 4 are the spread's)
        for got, want in zip(
            [state(ours)[i] for i in kept], [state(theirs)[i] for i in kept], strict=True
        ):
            assert torch.equal(got, want)
        assert ours.spread.values.mean is None
    assert torch.isinf(relative_errors(plain, [6, 6, 5, 6])).all()


def test_recalibrate_writes_what_recalibrate_report_writes():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.BatchNorm1d(6))
    batches = [torch.randn(9, 4) for _ in range(70)]  # more than one block of 64 rows
    plain, reported = copy.deepcopy(model), copy.deepcopy(model)
    bt.recalibrate(plain, batches)
    result = bt.recalibrate_report(reported, batches)
    for key, value in plain.state_dict().items():
        assert torch.equal(value, reported.state_dict()[key]), key
    assert all(math.isfinite(error) for error in result.relative_errors.values())
