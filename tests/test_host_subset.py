"""bnstats._host_subset through the NumPy-only fake framework of tests/test_host_pass.py: data
larger than the one-batch budget reach the level-by-level numbers in a few whole passes, the
first batches that fit solved as one batch; the levels take over wherever the subset cannot
guide them, with their own numbers and errors."""

from __future__ import annotations

import numpy as np
import pytest

from bnstats import _host_one_batch, _host_subset
from bnstats._host_one_batch import subset_within
from bnstats._host_pass import HostLayer, HostMeasured
from tests.counted import Counted
from tests.test_host_one_batch import at_most
from tests.test_host_pass import (
    EPS,
    assert_population,
    chain,
    data,
    eval_reference,
    recalibrate,
)

DEPTH = 12
"""BN layers of the test chain, one per depth level: 13 passes level by level."""
BYTES_PER_SAMPLE = 16
"""4 channels of 4 bytes: the chain's largest BN input per sample, for the budget."""
SUBSET_SAMPLES = 512
"""The samples the budget of :func:`over_the_budget` takes: 16 batches of 32."""


def deep(rng: np.random.Generator):
    steps = ["W1", "l0"]
    for index in range(1, DEPTH):
        steps += ["relu", "W2", f"l{index}"]
    return chain(rng, steps)


def over_the_budget(net, batches: list[np.ndarray], **options) -> HostMeasured:
    """``mode="eval"`` with the one batch on and a budget of :data:`SUBSET_SAMPLES` samples."""
    budget = SUBSET_SAMPLES * BYTES_PER_SAMPLE
    return recalibrate(net, batches, mode="eval", one_batch=True, one_batch_bytes=budget, **options)


def worst_from(measured: HostMeasured, reference: dict[str, np.ndarray]) -> float:
    """The worst channel's ``|d mean| / sqrt(var + eps)`` or ``|d var| / (var + eps)`` from
    the ``reference`` inputs (the movement eval mode's check measures)."""
    worst = 0.0
    for name, values in reference.items():
        mean, var = measured.layers[name].statistics()
        scale = values.var(axis=0) + EPS
        worst = max(
            worst,
            float(np.max(np.abs(mean - values.mean(axis=0)) / np.sqrt(scale))),
            float(np.max(np.abs(var - values.var(axis=0)) / scale)),
        )
    return worst


def test_data_over_the_budget_reach_the_levels_numbers_in_a_few_whole_passes(rng):
    """2,048 samples in 64 batches, a budget of 512 samples: the first 16 batches are the
    subset. 7 passes over the data (13 level by level) and 11 forwards of the subset, within
    1e-4 of the exact numbers; the subset drawn once, by the first pass."""
    net, batches = deep(rng), Counted(data(rng, [32] * 64))
    measured = over_the_budget(net, batches)
    assert measured.passes == 7 and measured.subset_passes == 11
    assert batches.drawn == measured.passes
    assert net.forwards == measured.passes * 64 + measured.subset_passes
    assert measured.batch_sizes == [32] * 64
    reference = eval_reference(net, batches)
    assert worst_from(measured, reference) < 1e-4
    for name, values in reference.items():  # the counts are those of all the data
        assert measured.layers[name].population.count == len(values)
    levels = recalibrate(net, batches, mode="eval", one_batch=True, one_batch_bytes=0)
    assert levels.passes == DEPTH + 1 and levels.subset_passes == 0


def test_rounds_that_stop_shrinking_hand_over_to_the_levels(rng, monkeypatch):
    """With every round asked to shrink the movement a billionfold (SHRINK = 1e-9), the
    first corrected round goes on (it is not judged) and the second ends the subset: the
    levels go on from the first pass, to their exact numbers, counting the passes spent (3
    whole; the 5 subset forwards apart)."""
    monkeypatch.setattr(_host_subset, "SHRINK", 1e-9)
    net, batches = deep(rng), data(rng, [32] * 64)
    measured = over_the_budget(net, batches)
    assert measured.passes == DEPTH + 1 + 3 and measured.subset_passes == 5
    for name, values in eval_reference(net, batches).items():
        assert_population(measured.layers[name], values)


def test_a_failing_subset_forward_takes_the_levels(rng):
    """A model written for batches of at most 32 samples: the subset's joined forward raises,
    the levels run (that forward counted), the model's error is never shown."""

    net = deep(rng)
    net.steps.insert(0, at_most(32))
    batches = data(rng, [32] * 64)
    measured = over_the_budget(net, batches)
    assert measured.passes == DEPTH + 1 and measured.subset_passes == 1
    for name, values in eval_reference(net, batches).items():
        assert_population(measured.layers[name], values)


def test_nan_outside_the_subset_takes_the_levels_and_their_errors(rng):
    """A batch that turns NaN after the first layer, past the subset: the whole pass leaves it
    out, so the subset gives no number; the levels raise as they do alone, or leave it out
    under skip."""
    net, marked = deep(rng), {}

    def mark(x: np.ndarray) -> np.ndarray:
        marked["rows"] = x[:, :1] == 77.0
        return x

    net.steps.insert(0, mark)
    net.steps.insert(3, lambda x: np.where(marked["rows"], np.nan, x))  # after l0
    batches = data(rng, [32] * 64)
    batches[40][0, 0] = 77.0  # finite input: l0 takes it, l1 sees NaN
    with pytest.raises(ValueError, match="BN layer 'l1': 1 of 64 batches"):
        over_the_budget(net, batches)
    measured = over_the_budget(net, batches, nonfinite="skip")
    levels = recalibrate(net, batches, mode="eval", nonfinite="skip")
    assert measured.passes == levels.passes + 1  # one whole pass spent
    assert measured.subset_passes == 1
    for name, host in levels.layers.items():
        np.testing.assert_array_equal(measured.layers[name].statistics(), host.statistics())


def test_the_subset_is_the_first_batches_that_fit_the_budget():
    """The largest BN input per sample (over the first pass's samples) sets how many of the
    first batches fit; fewer than SUBSET_LEAST (64) samples, a layer called twice in a
    forward, or no input measured: no subset."""

    def first(values: dict[str, float], calls: int = 1) -> HostMeasured:
        layers = {}
        for name, size in values.items():
            host = HostLayer(name, 4, np.zeros(4), max_calls_per_forward=calls)
            host.values = size
            layers[name] = host
        return HostMeasured(layers, [20] * 50)

    batches = [f"batch {index}" for index in range(50)]
    # 1,000 samples; the largest layer 8,000 values: 32 bytes per sample
    measured = first({"a": 4_000.0, "b": 8_000.0})
    assert subset_within(measured, batches, 32 * 99) == batches[:4]
    assert subset_within(measured, batches, 32 * 79) is None  # 60 < 64 samples
    assert subset_within(measured, batches[:3], 32 * 1_000) is None  # only 3 kept
    assert subset_within(measured, batches, 32 * 10_000) == batches
    assert subset_within(first({"a": 8_000.0}, calls=2), batches, 32 * 99) is None
    assert subset_within(first({"a": 0.0}), batches, 32 * 99) is None
    assert _host_one_batch.SUBSET_LEAST == 64
