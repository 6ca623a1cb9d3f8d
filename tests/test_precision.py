"""The precision of a Population: the standard errors from the spread between its batches,
written out from the values, and the union bound over every channel's estimates."""

from __future__ import annotations

import math

import numpy as np
import pytest

from bnstats.precision import BatchSpread, miss_probability
from bnstats.stats import Population
from tests.test_stats import _batches, _torch_moments

torch = pytest.importorskip("torch")


def _spread_of(batches, kind, center):
    counts = [len(b) for b in batches]
    means = np.stack([b.mean(0) for b in batches])
    m2s = np.stack([b.var(0) * len(b) for b in batches])
    if kind == "torch":
        means, m2s, center = (torch.from_numpy(a) for a in (means, m2s, center))
    population, spread = Population(), BatchSpread(center)
    population.update_batches(counts, means, m2s)
    spread.update_batches(counts, means, m2s)
    return population, spread


@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_batch_spread_standard_errors_are_the_cluster_sampling_formulas(rng, kind):
    """Written out directly from the values: ``d_k`` batch k's mean of ``(z - mu)**2``."""
    batches = _batches(rng, [16, 7, 32, 3, 16, 9], loc=50.0, scale=2.0)
    population, spread = _spread_of(batches, kind, center=np.full(5, 49.0))
    se_mean, se_var = (np.asarray(x) for x in spread.standard_errors(population, len(batches)))
    whole = np.concatenate(batches)
    n = np.array([len(b) for b in batches])[:, None]
    total, mu = len(whole), whole.mean(0)
    means = np.stack([b.mean(0) for b in batches])
    d = np.stack([((b - mu) ** 2).mean(0) for b in batches])
    d_bar = (n * d).sum(0) / total
    cluster = total * (len(batches) - 1)
    np.testing.assert_allclose(se_mean**2, (n * (means - mu) ** 2).sum(0) / cluster, rtol=1e-9)
    expected_var = (n * (d - d_bar) ** 2).sum(0) / cluster * (total / (total - 1)) ** 2
    np.testing.assert_allclose(se_var**2, expected_var, rtol=1e-7)
    worst = max(
        (se_mean / whole.var(0, ddof=1) ** 0.5).max(), (se_var / whole.var(0, ddof=1)).max()
    )
    assert float(spread.relative_error(population, len(batches))) == pytest.approx(worst, rel=1e-12)


def test_batch_spread_needs_two_batches_and_merges_like_one(rng):
    batches = _batches(rng, [8, 5, 12, 9])
    population, spread = _spread_of(batches[:1], "numpy", center=np.zeros(5))
    assert np.isinf(spread.standard_errors(population, 1)).all()
    whole_population, whole = _spread_of(batches, "numpy", center=np.zeros(5))
    parts = [_spread_of(batches[:2], "numpy", np.zeros(5)), _spread_of(batches[2:], "numpy", None)]
    second = parts[1][1]  # centered on its own first batch's mean: merge moves it
    merged = parts[0][1].merge(BatchSpread.from_flat(second.to_flat(5), second.center))
    assert not np.allclose(second.center, parts[0][1].center)
    merged_population = parts[0][0].merge(parts[1][0])
    for got, expected in zip(
        merged.standard_errors(merged_population, 4),
        whole.standard_errors(whole_population, 4),
        strict=True,
    ):
        np.testing.assert_allclose(got, expected, rtol=1e-12)


@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_a_center_far_from_the_data_does_not_cost_the_standard_errors(rng, kind):
    """Data at 1e5 standard deviations from a fresh layer's running mean of 0: the
    standard errors cancelled to nothing (a quarter of them clamped to 0 at 1e4). The first
    batches now set the center, whatever center was given, and moving the spread to another
    center near the data (as merging another rank's does) keeps its standard errors."""
    batches = _batches(rng, [32] * 40, loc=1e5, scale=1.0)
    near, reference = _spread_of(batches, kind, center=np.full(5, 1e5 + 0.5))
    _, far = _spread_of(batches, kind, center=np.zeros(5))
    np.testing.assert_allclose(np.asarray(far.center), np.concatenate(batches).mean(0), rtol=1e-12)
    expected = [np.asarray(x) for x in reference.standard_errors(near, 40)]
    for got, want in zip(far.standard_errors(near, 40), expected, strict=True):
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6)
    for center in (np.full(5, 1e5 - 3.0), np.full(5, 1e5 + 2.0)):
        moved = reference.recentered(torch.from_numpy(center) if kind == "torch" else center)
        for got, want in zip(moved.standard_errors(near, 40), expected, strict=True):
            np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6)


@pytest.mark.parametrize("empty_at", ["first", "middle", "last"])
def test_a_group_of_batches_of_count_zero_changes_nothing(rng, empty_at):
    """The NaN batches of a pass weigh 0 (whatever their moments hold, NaN included); a whole
    group of them must not turn the Population or the spread into NaN."""
    good = _batches(rng, [8, 5, 12, 9, 7, 6], loc=3.0, scale=2.0)
    nan_group = (
        torch.zeros(4, dtype=torch.float64),
        torch.full((4, 5), float("nan"), dtype=torch.float64),
        torch.full((4, 5), float("nan"), dtype=torch.float64),
    )
    groups = [_torch_moments(good[:3]), _torch_moments(good[3:])]
    groups.insert({"first": 0, "middle": 1, "last": 2}[empty_at], nan_group)
    center = torch.full((5,), 2.5, dtype=torch.float64)
    population, spread = Population(), BatchSpread(center)
    for counts, means, m2s in groups:
        population.update_batches(counts, means, m2s)
        spread.update_batches(counts, means, m2s)
    whole = np.concatenate(good)
    np.testing.assert_allclose(population.mean.numpy(), whole.mean(0), rtol=1e-13)
    np.testing.assert_allclose(population.var.numpy(), whole.var(0, ddof=1), rtol=1e-12)
    assert float(population.count) == len(whole)
    reference, reference_spread = _spread_of(good, "numpy", center.numpy())
    for got, expected in zip(
        spread.standard_errors(population, len(good)),
        reference_spread.standard_errors(reference, len(good)),
        strict=True,
    ):
        np.testing.assert_allclose(got.numpy(), expected, rtol=1e-10)


@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_relative_error_of_one_batch_is_infinite_not_the_largest_float(rng, kind):
    batches = _batches(rng, [8])
    population, spread = _spread_of(batches, kind, center=np.zeros(5))
    assert float(spread.relative_error(population, 1)) == float("inf")


def test_miss_probability_of_equal_errors_is_the_bonferroni_quantile():
    """K estimates of one standard error ``r`` miss with probability at most 0.05 exactly
    when ``r * Phi^-1(1 - 0.05 / (2 K))`` is the tolerance; NaN and inf count 1, 0 counts 0."""
    from statistics import NormalDist

    z = NormalDist().inv_cdf(1 - 0.05 / 1120)
    assert float(miss_probability(np.full((2, 280), 1e-2 / z), 1e-2)) == pytest.approx(0.05)
    assert float(miss_probability(np.array([np.nan, np.inf, 0.0]), 1e-2)) == 2.0
    one = float(miss_probability(np.array([1e-2]), 1e-2))
    assert one == pytest.approx(0.3173105, abs=1e-7)  # P(|Z| > 1)


def test_miss_probability_of_a_share_of_the_data_shrinks_each_error_by_the_correction():
    """Judged against the whole data set after drawing the share ``d`` of its batches: each
    relative error times ``sqrt(1 - d)``; all of them drawn: exact (0), infinite errors too."""
    errors = np.array([1e-2, 2e-2, 5e-3])
    halved = float(miss_probability(errors, 1e-2, drawn=np.array([0.75, 0.75, 0.0])))
    by_hand = float(miss_probability(errors * np.array([0.5, 0.5, 1.0]), 1e-2))
    assert halved == pytest.approx(by_hand, rel=1e-12)
    assert float(miss_probability(errors, 1e-2, drawn=0.0)) == float(miss_probability(errors, 1e-2))
    assert float(miss_probability(np.array([np.inf, 1.0]), 1e-2, drawn=1.0)) == 0.0
    assert float(miss_probability(np.array([np.inf]), 1e-2, drawn=0.5)) == 1.0


def test_miss_probability_of_tensors_stays_a_tensor():
    torch = pytest.importorskip("torch")
    errors = torch.tensor([[1e-2, float("nan")], [float("inf"), 0.0]], dtype=torch.float64)
    miss = miss_probability(errors, 1e-2)
    assert isinstance(miss, torch.Tensor) and miss.item() == pytest.approx(2.3173105)
    drawn = torch.tensor([[0.75, 1.0], [1.0, 0.0]], dtype=torch.float64)
    shrunk = miss_probability(errors, 1e-2, drawn)
    assert isinstance(shrunk, torch.Tensor)
    assert shrunk.item() == pytest.approx(math.erfc(2 / math.sqrt(2)))  # P(|Z| > 2)
