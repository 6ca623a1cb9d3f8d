"""Property tests: estimators and functional code over random shapes, dtypes and batch splits."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from bnstats import functional as F
from bnstats.stats import EMA, CumulativeAverage, Population

SHAPES = hnp.array_shapes(min_dims=2, max_dims=4, min_side=1, max_side=5)
DTYPES = st.sampled_from([np.float16, np.float32, np.float64])


def _split_points(n: int, cuts: list[int]) -> list[int]:
    return sorted({c % n for c in cuts if 0 < c % n < n})


@settings(max_examples=80, deadline=None)
@given(
    shape=SHAPES,
    dtype=DTYPES,
    seed=st.integers(0, 2**32 - 1),
    cuts=st.lists(st.integers(1, 50), max_size=4),
)
def test_population_over_any_split_equals_whole_batch_moments(shape, dtype, seed, cuts):
    rng = np.random.default_rng(seed)
    x = (rng.normal(size=shape) * 3 + 1).astype(dtype)
    whole_mean, whole_var = F.moments(x)
    population = Population()
    for part in np.split(x, _split_points(shape[0], cuts)):
        mean, var = F.moments(part)
        population.update(mean, var, F.count_per_channel(part.shape))
    assert population.mean.dtype == np.float64, "accumulates in float64 whatever the input"
    np.testing.assert_allclose(population.mean, whole_mean, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(population.biased_var, whole_var, rtol=1e-9, atol=1e-12)
    assert population.count == F.count_per_channel(shape)


@settings(max_examples=60, deadline=None)
@given(
    momentum=st.floats(0.001, 1.0),
    debias=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
    sizes=st.lists(st.integers(2, 20), min_size=1, max_size=8),
)
def test_running_averages_stay_within_the_batch_values(momentum, debias, seed, sizes):
    """Every running estimate is a weighted average of its start and the batch values, so it
    stays inside their range; the debiased EMA and the cumulative average have no start."""
    rng = np.random.default_rng(seed)
    estimators = [EMA(momentum, debias=debias), CumulativeAverage()]
    means, unbiased = [], []
    for n in sizes:
        batch = rng.normal(5.0, 2.0, size=(n, 3))
        mean, var = F.moments(batch)
        means.append(mean)
        unbiased.append(var * n / (n - 1))
        for est in estimators:
            est.update(mean, var, n)
    low_m, high_m = np.min(means, 0), np.max(means, 0)
    low_v, high_v = np.min(unbiased, 0), np.max(unbiased, 0)
    slack = 1e-9
    for est in estimators:
        starts = isinstance(est, EMA) and not est.debias
        lo_m, hi_m = (np.minimum(low_m, 0), np.maximum(high_m, 0)) if starts else (low_m, high_m)
        lo_v, hi_v = (np.minimum(low_v, 1), np.maximum(high_v, 1)) if starts else (low_v, high_v)
        assert np.all(est.mean >= lo_m - slack) and np.all(est.mean <= hi_m + slack)
        assert np.all(est.var >= lo_v - slack) and np.all(est.var <= hi_v + slack)


@settings(max_examples=40, deadline=None)
@given(shape=SHAPES, dtype=DTYPES, seed=st.integers(0, 2**32 - 1))
def test_forward_normalizes_each_channel(shape, dtype, seed):
    rng = np.random.default_rng(seed)
    x = (rng.normal(size=shape) * 4 - 2).astype(dtype)
    gamma, beta = np.ones(shape[1]), np.zeros(shape[1])
    out, cache = F.batch_norm_forward(x, gamma, beta, eps=1e-12 if dtype == np.float64 else 1e-5)
    assert out.shape == x.shape and out.dtype == np.result_type(dtype, np.float32)
    axes = F.reduction_axes(len(shape))
    varying = cache.var > 1e-3
    np.testing.assert_allclose(out.astype(np.float64).mean(axis=axes), 0, atol=1e-3)
    np.testing.assert_allclose(out.astype(np.float64).var(axis=axes)[varying], 1, rtol=1e-2)


@settings(max_examples=40, deadline=None)
@given(
    shape=SHAPES.filter(lambda s: np.prod(s) // s[1] >= 2),
    seed=st.integers(0, 2**32 - 1),
)
def test_backward_gradients_are_invariant_to_shift_and_scale(shape, seed):
    """Batch norm's output ignores a per-channel shift of its input, so the input gradient sums
    to zero per channel. A scale of the input changes the output only through eps, so
    ``sum(dz * z_norm) = inv_std * sum(g * z_norm) * eps / (var + eps)`` with
    ``g = gamma * upstream``: zero when eps is."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=shape)
    gamma, beta = rng.normal(size=shape[1]), rng.normal(size=shape[1])
    upstream = rng.normal(size=shape)
    eps = 1e-5
    _, cache = F.batch_norm_forward(x, gamma, beta, eps=eps)
    dz, _, _ = F.batch_norm_backward(upstream, cache)
    axes = F.reduction_axes(len(shape))
    g = upstream * F.channel_view(gamma, len(shape))
    np.testing.assert_allclose(dz.sum(axis=axes), 0, atol=1e-9)
    expected = cache.inv_std * (g * cache.z_norm).sum(axis=axes) * eps / (cache.var + eps)
    np.testing.assert_allclose((dz * cache.z_norm).sum(axis=axes), expected, rtol=1e-6, atol=1e-9)
