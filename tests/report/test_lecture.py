"""The numbers behind the lecture's picture: the right layer, the right units, like with like."""

from __future__ import annotations

import numpy as np
import pytest

from bnstats import EMA
from bnstats.engine import History, Network
from bnstats.report.lecture import (
    DEFAULT_UNIT_COUNT,
    lecture_traces,
    typical_batch_size,
    unbiased_batch_var,
)


def test_unbiased_batch_var_is_bessel_corrected_per_step(rng):
    biased = rng.uniform(0.1, 2.0, size=(4, 3))
    sizes = np.array([64, 64, 3, 10])
    out = unbiased_batch_var(biased, sizes)
    for t, n in enumerate(sizes):
        np.testing.assert_allclose(out[t], biased[t] * n / (n - 1), rtol=1e-15)


@pytest.mark.parametrize(
    ("sizes", "message"),
    [(np.array([64, 1]), "batch of 1 row"), (np.array([64]), "one batch size per step")],
)
def test_unbiased_batch_var_refuses_impossible_sizes(sizes, message):
    with pytest.raises(ValueError, match=message):
        unbiased_batch_var(np.ones((2, 3)), sizes)


def test_converted_batch_var_feeds_the_recorded_ema_exactly(quick_run):
    """The EMA's recurrence applied to the converted batch values gives back the recorded
    EMA of var: the dots and the line in the var figure are on the same (unbiased) footing."""
    trace = lecture_traces(quick_run.history, quick_run.net)["var"]
    m = trace.momentum
    running = np.ones(trace.features)
    for t in range(trace.steps):
        running = (1 - m) * running + m * trace.batch[t]
        np.testing.assert_allclose(running, trace.ema[t], rtol=1e-12)
    biased = np.stack(quick_run.history.layers[trace.layer]["batch_var"])
    assert not np.allclose(biased, trace.batch), "the biased values must have been converted"


def test_mean_trace_is_the_history_and_the_population(quick_run):
    traces = lecture_traces(quick_run.history, quick_run.net, layer="bn2", units=[5, 0])
    mean = traces["mean"]
    bn2 = quick_run.net.batchnorm_layers[1]
    assert (mean.layer, mean.units, mean.features) == ("bn2", (5, 0), bn2.num_features)
    recorded = quick_run.history.layers["bn2"]
    np.testing.assert_array_equal(mean.batch, np.stack(recorded["batch_mean"]))
    np.testing.assert_array_equal(mean.ema_debiased, np.stack(recorded["ema_debiased_mean"]))
    np.testing.assert_array_equal(mean.population, bn2.estimators["population"].mean)
    np.testing.assert_array_equal(traces["var"].population, bn2.estimators["population"].var)
    assert mean.steps == quick_run.history.steps
    assert mean.momentum == quick_run.config.momentum


def test_default_is_the_first_layer_and_its_first_units(quick_run):
    trace = lecture_traces(quick_run.history, quick_run.net)["mean"]
    assert trace.layer == quick_run.net.batchnorm_layers[0].name == "bn1"
    assert trace.units == tuple(range(DEFAULT_UNIT_COUNT))


def test_bad_layer_names_the_available_ones(quick_run):
    with pytest.raises(ValueError, match="no BatchNorm layer named 'bn9'") as info:
        lecture_traces(quick_run.history, quick_run.net, layer="bn9")
    assert "bn1, bn2" in str(info.value)


@pytest.mark.parametrize(
    ("units", "message"),
    [
        ([8], r"layer 'bn2' has 8 units \(0 to 7\); unit 8 is not one"),
        ([-1], "unit -1 is not one"),
        ([], "at least one unit"),
        ([1, 1], "must not repeat"),
        ([1.5], "whole numbers"),
        ([True], "whole numbers"),
    ],
)
def test_bad_units_get_one_clear_error(quick_run, units, message):
    with pytest.raises(ValueError, match=message):
        lecture_traces(quick_run.history, quick_run.net, layer="bn2", units=units)


def test_missing_population_or_history_is_named(quick_run):
    with pytest.raises(ValueError, match="no statistics of layer 'bn1'"):
        lecture_traces(History(), quick_run.net)
    estimators = {"ema": EMA(0.1), "ema_debiased": EMA(0.1, debias=True)}
    net = Network.mlp([4, 3, 2], estimators=estimators)
    X, y = np.random.default_rng(0).normal(size=(8, 4)), np.arange(8) % 2
    history = net.fit(X, y, epochs=1, batch_size=4)
    with pytest.raises(ValueError, match=r"layer 'bn1' has no population .* net.recalibrate"):
        lecture_traces(history, net)
    net.recalibrate(X)
    assert lecture_traces(history, net)["var"].steps == 2


def test_typical_batch_size_is_the_most_common():
    assert typical_batch_size(np.array([64, 64, 3, 64, 3])) == 64
    assert typical_batch_size(np.array([5, 7, 7])) == 7


def test_ghost_traces_are_what_the_estimators_took(rng):
    """With Ghost BN the estimators take one update per virtual batch: the trace has one dot
    per update, with its own rows, and the replayed EMAs end where the layer's estimators do."""
    from functools import partial

    from bnstats.engine import GhostBatchNorm

    estimators = {"ema": EMA(0.1), "ema_debiased": EMA(0.1, debias=True)}
    net = Network.mlp([4, 6, 2], estimators=estimators, norm=partial(GhostBatchNorm, ghost_size=4))
    X, y = rng.normal(size=(22, 4)), np.arange(22) % 2
    history = net.fit(X, y, epochs=2, batch_size=10)
    net.recalibrate(X)
    trace = lecture_traces(history, net)["mean"]
    bn1 = net.batchnorm_layers[0]
    assert trace.steps == bn1.estimators["ema"].num_batches_tracked == 2 * (3 + 3 + 1)
    assert trace.training_steps == history.steps == 6 and trace.virtual
    assert list(trace.batch_size[:7]) == [4, 4, 2, 4, 4, 2, 2]
    for key, replayed in (("ema", trace.ema), ("ema_debiased", trace.ema_debiased)):
        np.testing.assert_array_equal(replayed[-1], bn1.estimators[key].mean)
    np.testing.assert_allclose(trace.ema[0], 0.1 * trace.batch[0], rtol=1e-15)


def test_full_batches_are_the_largest_even_when_outnumbered():
    assert typical_batch_size(np.array([41, 64, 41, 64])) == 64
    assert typical_batch_size(np.array([3, 3, 3, 64])) == 64
