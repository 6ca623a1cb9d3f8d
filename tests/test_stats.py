"""The estimators, checked against PyTorch's BatchNorm buffers and exact NumPy statistics."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import bnstats
from bnstats import functional as F
from bnstats.stats import (
    EMA,
    CumulativeAverage,
    NonFiniteStatisticsError,
    Population,
    chan_merge,
    decay_from_momentum,
    estimator_from_state,
    momentum_from_decay,
)

torch = pytest.importorskip("torch")


def _batches(rng, sizes, features=5, loc=3.0, scale=2.0):
    return [rng.normal(loc, scale, size=(n, features)) for n in sizes]


def _feed(estimator, batches):
    for batch in batches:
        mean, var = F.moments(batch)
        estimator.update(mean, var, batch.shape[0])
    return estimator


def _torch_buffers(batches, momentum):
    bn = torch.nn.BatchNorm1d(batches[0].shape[1], momentum=momentum, dtype=torch.float64)
    bn.train()
    with torch.no_grad():
        for batch in batches:
            bn(torch.from_numpy(batch))
    return bn.running_mean.numpy(), bn.running_var.numpy(), int(bn.num_batches_tracked)


@pytest.mark.parametrize("momentum", [0.1, 0.01, 0.5, 1.0])
def test_ema_equals_torch_batchnorm_buffers(rng, momentum):
    batches = _batches(rng, [16, 7, 32, 3, 16, 9])
    ema = _feed(EMA(momentum), batches)
    running_mean, running_var, tracked = _torch_buffers(batches, momentum)
    np.testing.assert_allclose(ema.mean, running_mean, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(ema.var, running_var, rtol=1e-12)
    assert ema.num_batches_tracked == tracked


def test_cumulative_average_equals_torch_with_momentum_none(rng):
    batches = _batches(rng, [16, 7, 32, 3, 16, 9])
    cumulative = _feed(CumulativeAverage(), batches)
    running_mean, running_var, _ = _torch_buffers(batches, None)
    np.testing.assert_allclose(cumulative.mean, running_mean, rtol=1e-12)
    np.testing.assert_allclose(cumulative.var, running_var, rtol=1e-12)


def test_cumulative_average_is_mean_of_batch_statistics(rng):
    """Ioffe & Szegedy: E[x] = mean of batch means, Var = m/(m-1) * mean of batch variances."""
    batches = _batches(rng, [10] * 8)
    cumulative = _feed(CumulativeAverage(), batches)
    np.testing.assert_allclose(cumulative.mean, np.mean([b.mean(0) for b in batches], 0))
    expected_var = 10 / 9 * np.mean([b.var(0) for b in batches], 0)
    np.testing.assert_allclose(cumulative.var, expected_var)


def test_debiased_ema_after_one_update_is_that_batch(rng):
    batch = rng.normal(5.0, 3.0, size=(20, 4))
    ema = _feed(EMA(0.1, debias=True), [batch])
    np.testing.assert_array_equal(ema.mean, batch.mean(0))
    np.testing.assert_allclose(ema.var, batch.var(0, ddof=1), rtol=1e-15)


def test_debiased_ema_weights_sum_to_one(rng):
    """Constant batches: the debiased estimate is that constant at every step, the plain EMA is
    still pulled toward its start 0 / 1 by (1 - momentum)**t."""
    batch = rng.normal(4.0, 1.0, size=(8, 3))
    debiased, plain = EMA(0.1, debias=True), EMA(0.1)
    for t in range(1, 11):
        _feed(debiased, [batch])
        _feed(plain, [batch])
        np.testing.assert_allclose(debiased.mean, batch.mean(0), rtol=1e-13)
        leftover = 0.9**t
        np.testing.assert_allclose(plain.mean, (1 - leftover) * batch.mean(0), rtol=1e-13)
    assert abs(0.9**10 - 0.3487) < 1e-4  # the 35 % of references.md


def test_estimators_are_none_before_any_batch():
    for estimator in (EMA(), EMA(debias=True), CumulativeAverage(), Population()):
        assert estimator.mean is None and estimator.var is None and estimator.count == 0


@settings(max_examples=60, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 40), min_size=1, max_size=12),
    seed=st.integers(0, 2**31 - 1),
    offset=st.floats(-100, 100),
    scale=st.floats(1e-3, 1e3),
)
def test_population_equals_numpy_for_any_split(sizes, seed, offset, scale):
    """Exact to 1e-12 while the mean is within 100 standard deviations of zero; beyond that
    float64 rounding of the batch means alone costs ~eps * |mean| / std (see the float32 test
    below for a mean 1e8 times the spread)."""
    loc = offset * scale
    if sum(sizes) < 2:
        sizes = sizes + [2]
    rng = np.random.default_rng(seed)
    batches = _batches(rng, sizes, features=3, loc=loc, scale=scale)
    population = _feed(Population(), batches)
    data = np.concatenate(batches)
    np.testing.assert_allclose(population.mean, data.mean(0), rtol=1e-12, atol=1e-12 * scale)
    np.testing.assert_allclose(population.var, data.var(0, ddof=1), rtol=1e-12)
    assert population.count == len(data)


def test_population_float32_data_with_large_mean_small_spread(rng):
    data = rng.normal(1e6, 1e-2, size=(20000, 3)).astype(np.float32)
    truth = data.astype(np.float64)
    assert np.all(truth.var(0) > 0), "the float32 data must keep some spread"
    population = Population()
    for batch in np.array_split(data, 37):
        mean, var = F.moments(batch)
        population.update(mean, var, len(batch))
    np.testing.assert_allclose(population.mean, truth.mean(0), rtol=1e-6)
    np.testing.assert_allclose(population.var, truth.var(0, ddof=1), rtol=1e-6)
    naive = (truth**2).mean(0) - truth.mean(0) ** 2  # what E[z^2] - E[z]^2 gives
    assert not np.allclose(naive, truth.var(0), rtol=1e-2)


def test_population_merge_equals_one_population(rng):
    batches = _batches(rng, [5, 17, 2, 30])
    left, right = _feed(Population(), batches[:2]), _feed(Population(), batches[2:])
    merged = left.merge(right)
    whole = np.concatenate(batches)
    np.testing.assert_allclose(merged.mean, whole.mean(0), rtol=1e-13)
    np.testing.assert_allclose(merged.var, whole.var(0, ddof=1), rtol=1e-13)
    assert merged.count == len(whole) and merged.num_batches_tracked == 4
    assert left.count == 22, "merge must not change its operands"
    assert Population().merge(left).count == left.count


def test_population_merge_rejects_other_shapes(rng):
    a = _feed(Population(), _batches(rng, [4], features=3))
    b = _feed(Population(), _batches(rng, [4], features=2))
    with pytest.raises(ValueError, match="shapes"):
        a.merge(b)
    with pytest.raises(TypeError):
        a.merge(EMA())


def test_chan_merge_with_empty_side():
    mean, m2 = chan_merge(0, np.zeros(2), np.zeros(2), 4, np.array([1.0, 2.0]), np.ones(2))
    np.testing.assert_array_equal(mean, [1.0, 2.0])
    np.testing.assert_array_equal(m2, [1.0, 1.0])


@pytest.mark.parametrize(
    "make", [lambda: EMA(0.1), lambda: EMA(0.2, debias=True), CumulativeAverage, Population]
)
def test_state_dict_round_trip(rng, make):
    batches = _batches(rng, [8, 9, 10])
    original = _feed(make(), batches)
    restored = estimator_from_state(original.state_dict())
    np.testing.assert_array_equal(restored.mean, original.mean)
    np.testing.assert_array_equal(restored.var, original.var)
    assert restored.count == original.count == 27
    _feed(original, batches[:1])
    _feed(restored, batches[:1])
    np.testing.assert_array_equal(restored.var, original.var)


def test_load_state_dict_rejects_another_kind(rng):
    state = _feed(EMA(), _batches(rng, [4])).state_dict()
    with pytest.raises(ValueError, match="EMA"):
        Population().load_state_dict(state)


def test_nonfinite_batch_raises_and_leaves_estimate(rng):
    ema = _feed(EMA(), _batches(rng, [8]))
    before = ema.mean.copy()
    with pytest.raises(NonFiniteStatisticsError):
        ema.update(np.array([np.nan, 0, 0, 0, 0]), np.ones(5), 8)
    np.testing.assert_array_equal(ema.mean, before)
    assert ema.num_batches_tracked == 1


def test_nonfinite_skip_counts_skipped_batches(rng):
    population = _feed(Population(nonfinite="skip"), _batches(rng, [8]))
    population.update(np.ones(5), np.array([np.inf, 1, 1, 1, 1]), 8)
    assert population.num_batches_skipped == 1 and population.count == 8
    assert np.all(np.isfinite(population.var))


@pytest.mark.parametrize(
    ("mean", "var", "count", "message"),
    [
        (np.zeros(3), np.ones(4), 5, "shape"),
        (np.zeros(3), -np.ones(3), 5, "negative"),
        (np.zeros(3), np.ones(3), 0, "positive"),
    ],
)
def test_bad_updates_are_rejected(mean, var, count, message):
    with pytest.raises(ValueError, match=message):
        EMA().update(mean, var, count)


def test_shape_must_stay_the_same(rng):
    ema = _feed(EMA(), _batches(rng, [4], features=3))
    with pytest.raises(ValueError, match=r"\(3,\)"):
        ema.update(np.zeros(2), np.ones(2), 4)


def test_unbiased_variance_needs_two_values():
    with pytest.raises(ValueError, match="at least 2"):
        EMA().update(np.zeros(2), np.zeros(2), 1)


def test_momentum_conventions():
    assert momentum_from_decay(0.99) == pytest.approx(0.01)
    assert decay_from_momentum(0.1) == pytest.approx(0.9)
    assert EMA.from_decay(0.9).momentum == pytest.approx(0.1)
    for bad in (0.0, -0.1, 1.5, None):
        with pytest.raises(ValueError):
            EMA(bad)


@pytest.mark.parametrize("digits", [1, 2, 3, 4])
def test_momentum_and_decay_compare_equal_to_the_decimal_a_user_writes(digits):
    """``momentum_from_decay(0.99) == 0.01`` as the README shows: every decimal fraction of up
    to 4 digits converts to exactly the float of the decimal ``1 - value`` (Python's own
    parsing of that decimal is the reference)."""
    for k in range(10**digits + 1):
        value = float(f"{k / 10**digits:.{digits}f}")
        expected = float(f"{(10**digits - k) / 10**digits:.{digits}f}")
        assert momentum_from_decay(value) == expected, value
        assert decay_from_momentum(value) == expected, value
    assert momentum_from_decay(0.99) == 0.01 and decay_from_momentum(0.01) == 0.99


def test_estimators_work_on_torch_tensors():
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randn(12, 4, generator=gen, dtype=torch.float32) * 2 + 1 for _ in range(5)]
    population, ema = Population(), EMA(0.1)
    for batch in batches:
        var, mean = torch.var_mean(batch, dim=0, unbiased=False)
        population.update(mean, var, batch.shape[0])
        ema.update(mean, var, batch.shape[0])
    whole = torch.cat(batches).double()
    assert population.mean.dtype == torch.float64
    torch.testing.assert_close(population.mean, whole.mean(0))
    torch.testing.assert_close(population.var, whole.var(0, unbiased=True))
    bn = torch.nn.BatchNorm1d(4)
    with torch.no_grad():
        for batch in batches:
            bn(batch)
    torch.testing.assert_close(ema.var.float(), bn.running_var)


# -- Population as the one accumulator: many batches at once, flat form ----------------------


@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_update_batches_equals_one_batch_at_a_time(rng, kind):
    batches = _batches(rng, [16, 7, 32, 3, 16, 9], loc=1e4, scale=0.5)
    one_by_one = _feed(Population(), batches)
    counts = [len(b) for b in batches]
    means = np.stack([b.mean(0) for b in batches])
    m2s = np.stack([b.var(0) * len(b) for b in batches])
    vectorised = Population()
    if kind == "torch":
        means, m2s = torch.from_numpy(means), torch.from_numpy(m2s)
    vectorised.update_batches(counts[:2], means[:2], m2s[:2])
    vectorised.update_batches(counts[2:], means[2:], m2s[2:])
    whole = np.concatenate(batches)
    np.testing.assert_allclose(np.asarray(vectorised.mean), whole.mean(0), rtol=1e-14)
    np.testing.assert_allclose(np.asarray(vectorised.var), whole.var(0, ddof=1), rtol=1e-10)
    np.testing.assert_allclose(np.asarray(vectorised.var), one_by_one.var, rtol=1e-10)
    assert float(vectorised.count) == whole.shape[0] and vectorised.num_batches_tracked == 6


def test_update_batches_counts_may_be_a_tensor_with_zero_weights(rng):
    means = torch.tensor([[1.0, 2.0], [float("nan"), 0.0], [3.0, 4.0]], dtype=torch.float64)
    m2s = torch.tensor([[2.0, 2.0], [0.0, 0.0], [2.0, 2.0]], dtype=torch.float64)
    counts = torch.tensor([4.0, 0.0, 4.0])
    population = Population()
    population.update_batches(counts, torch.nan_to_num(means), m2s)
    torch.testing.assert_close(population.mean, torch.tensor([2.0, 3.0], dtype=torch.float64))
    assert float(population.count) == 8


@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_flat_form_round_trips(rng, kind):
    batches = _batches(rng, [5, 9], features=3)
    if kind == "torch":
        batches = [torch.from_numpy(b) for b in batches]
    population = Population()
    for batch in batches:
        var, mean = (
            (np.var(batch, 0), np.mean(batch, 0))
            if kind == "numpy"
            else (torch.var_mean(batch, 0, correction=0))
        )
        population.update(mean, var, batch.shape[0])
    flat = population.to_flat(3)
    assert flat.shape == (8,)
    back = Population.from_flat(flat)
    np.testing.assert_allclose(np.asarray(back.var), np.asarray(population.var))
    assert back.count == 14 and back.num_batches_tracked == 2
    assert Population.from_flat(Population().to_flat(3)).mean is None


# -- bad input: one clear error, nothing changed ---------------------------------------------


@pytest.mark.parametrize("make", [lambda: EMA(0.1), CumulativeAverage, Population])
def test_infinite_count_is_refused(make):
    with pytest.raises(ValueError, match="finite positive"):
        make().update(np.zeros(2), np.ones(2), float("inf"))


@pytest.mark.parametrize("make", [lambda: EMA(0.5), CumulativeAverage, Population])
def test_overflowing_update_is_refused_and_leaves_the_estimate(make):
    estimator = make()
    estimator.update(np.zeros(2), np.ones(2), 2)
    before = np.array(estimator.var, copy=True)
    with pytest.raises(NonFiniteStatisticsError, match="overflows"):
        estimator.update(np.array([1e308, -1e308]), np.array([1e308, 1e308]), 2)
    np.testing.assert_array_equal(estimator.var, before)
    assert estimator.num_batches_tracked == 1


def test_lists_and_python_floats_are_accepted():
    population = Population()
    population.update([0.0, 1.0], [1.0, 1.0], 4)
    population.update([0.5, 1.5], [0.25, 0.25], 4)
    scalar = EMA(0.5)
    scalar.update(0.5, 0.25, 4)
    assert float(scalar.mean) == pytest.approx(0.25)
    np.testing.assert_allclose(population.mean, [0.25, 1.25])


def test_numpy_and_torch_state_do_not_mix():
    population = Population()
    population.update(np.zeros(2), np.ones(2), 4)
    with pytest.raises(TypeError, match="NumPy arrays"):
        population.update(torch.zeros(2), torch.ones(2), 4)
    other = Population()
    other.update(torch.zeros(2), torch.ones(2), 4)
    with pytest.raises(TypeError, match="torch tensors"):
        population.merge(other)


def test_scalar_population_does_not_broadcast_into_channels():
    scalar, channels = Population(), Population()
    scalar.update(np.array(0.0), np.array(1.0), 4)
    channels.update(np.zeros(3), np.ones(3), 4)
    with pytest.raises(ValueError, match="shapes"):
        channels.merge(scalar)


def test_nonfinite_state_is_refused_on_load(rng):
    ema = _feed(EMA(0.1), _batches(rng, [8]))
    state = ema.state_dict()
    state["running_mean"] = state["running_mean"] * np.nan
    fresh = EMA(0.3)
    with pytest.raises(NonFiniteStatisticsError, match="running_mean"):
        fresh.load_state_dict(state)
    assert fresh.momentum == 0.3 and fresh.mean is None


def test_no_module_outside_stats_writes_an_estimators_private_state():
    """Estimators own their state: elsewhere it is loaded through public methods
    (``load_state_dict``, ``RunningAverage.load_running``)."""
    import re
    from pathlib import Path

    root = Path(bnstats.__file__).parent
    private = re.compile(r"\b(?!self\b)\w+\._(running_mean|running_var|shape|mean_acc|m2)\s*=")
    writers = [
        f"{path.relative_to(root)}:{number}"
        for path in root.rglob("*.py")
        if path.name != "stats.py"
        for number, line in enumerate(path.read_text().splitlines(), start=1)
        if private.search(line)
    ]
    assert writers == []


def test_fixed_statistics_never_moves_and_rebuilds_from_its_state():
    fixed = bnstats.FixedStatistics()
    fixed.update(np.array([3.0, -1.0]), np.array([2.0, 5.0]), 8)
    np.testing.assert_array_equal(fixed.mean, [0.0, 0.0])
    np.testing.assert_array_equal(fixed.var, [1.0, 1.0])
    rebuilt = bnstats.stats.estimator_from_state(fixed.state_dict())
    assert isinstance(rebuilt, bnstats.FixedStatistics) and rebuilt.num_batches_tracked == 1


# -- RunningAverage.update_sequence: many batches in order, bit for bit as update ------------

RUNNING_AVERAGES = [
    lambda: EMA(0.1),
    lambda: EMA(0.003, debias=True),
    lambda: EMA(1.0),
    lambda: CumulativeAverage(),
]


def _stacked(batches):
    counts = [len(b) for b in batches]
    means = np.stack([b.mean(0) for b in batches])
    variances = np.stack([b.var(0) for b in batches])
    return counts, means, variances


def _update_each(estimator, counts, means, variances):
    for count, mean, var in zip(counts, means, variances, strict=True):
        estimator.update(mean, var, count)


def _same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        if key in ("running_mean", "running_var"):
            assert type(sa[key]) is type(sb[key])
            np.testing.assert_array_equal(np.asarray(sa[key]), np.asarray(sb[key]), strict=True)
        else:
            assert sa[key] == sb[key] and type(sa[key]) is type(sb[key]), key


@pytest.mark.parametrize("make", RUNNING_AVERAGES)
@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_update_sequence_is_bit_identical_to_update_one_at_a_time(rng, make, kind):
    batches = _batches(rng, [16, 7, 32, 3, 16, 9, 64, 2], loc=-1e3, scale=0.5)
    counts, means, variances = _stacked(batches)
    if kind == "torch":
        means, variances = torch.from_numpy(means), torch.from_numpy(variances)
    one_by_one, sequence = make(), make()
    _update_each(one_by_one, counts, means, variances)
    sequence.update_sequence(counts[:3], means[:3], variances[:3])  # from the start
    sequence.update_sequence(counts[3:], means[3:], variances[3:])  # then from a state
    _same_state(one_by_one, sequence)
    assert np.asarray(sequence.mean).tobytes() == np.asarray(one_by_one.mean).tobytes()


@pytest.mark.parametrize("nonfinite", ["raise", "skip"])
def test_update_sequence_with_a_bad_batch_does_what_update_does(rng, nonfinite):
    counts, means, variances = _stacked(_batches(rng, [8, 8, 8, 8]))
    means[2, 1] = np.nan
    one_by_one, sequence = EMA(0.1, nonfinite=nonfinite), EMA(0.1, nonfinite=nonfinite)
    errors = []
    for feed in (
        lambda: _update_each(one_by_one, counts, means, variances),
        lambda: sequence.update_sequence(counts, means, variances),
    ):
        try:
            feed()
        except NonFiniteStatisticsError as err:
            errors.append(str(err))
    assert len(errors) == (2 if nonfinite == "raise" else 0)
    _same_state(one_by_one, sequence)
    assert sequence.num_batches_tracked == (2 if nonfinite == "raise" else 3)


def test_update_sequence_that_overflows_does_what_update_does():
    counts = [4, 4, 4]
    means = np.array([[1.0], [1e308], [1e308]])
    variances = np.array([[1.0], [1.5e308], [1.0]])  # unbiased: 2e308, beyond float64
    one_by_one, sequence = EMA(0.5, nonfinite="skip"), EMA(0.5, nonfinite="skip")
    _update_each(one_by_one, counts, means, variances)
    sequence.update_sequence(counts, means, variances)
    _same_state(one_by_one, sequence)
    assert sequence.num_batches_skipped == one_by_one.num_batches_skipped >= 1


def test_update_sequence_refuses_what_update_refuses(rng):
    counts, means, variances = _stacked(_batches(rng, [8, 8, 8]))
    with pytest.raises(ValueError, match="3 counts for 2 means and 3 variances"):
        EMA(0.1).update_sequence(counts, means[:2], variances)
    with pytest.raises(ValueError, match="at least 2 values per channel, got count=1"):
        EMA(0.1).update_sequence([8, 1, 8], means, variances)
    estimator = EMA(0.1)
    estimator.update(means[0, :3], variances[0, :3], 8)
    with pytest.raises(ValueError, match=r"expected statistics of shape \(3,\), got \(5,\)"):
        estimator.update_sequence(counts, means, variances)
    assert estimator.num_batches_tracked == 1


def test_update_sequence_of_no_batches_changes_nothing():
    estimator = EMA(0.1)
    estimator.update_sequence([], np.zeros((0, 3)), np.zeros((0, 3)))
    assert estimator.mean is None and estimator.num_batches_tracked == 0


def test_every_estimator_takes_a_sequence(rng):
    batches = _batches(rng, [8, 5, 9])
    one_by_one, sequence = _feed(Population(), batches), Population()
    sequence.update_sequence(*_stacked(batches))
    np.testing.assert_array_equal(sequence.var, one_by_one.var, strict=True)


# -- groups of batches that all weigh nothing leave the accumulators as they were ------------


def _torch_moments(batches):
    counts = torch.tensor([float(len(b)) for b in batches], dtype=torch.float64)
    means = torch.from_numpy(np.stack([b.mean(0) for b in batches]))
    m2s = torch.from_numpy(np.stack([b.var(0) * len(b) for b in batches]))
    return counts, means, m2s


def test_groups_of_count_zero_only_keep_the_population_empty_and_mergeable(rng):
    empty = Population()
    for _ in range(2):
        empty.update_batches(
            torch.zeros(3, dtype=torch.float64),
            torch.full((3, 2), float("nan"), dtype=torch.float64),
            torch.zeros(3, 2, dtype=torch.float64),
        )
    assert float(empty.count) == 0
    assert bool(torch.isfinite(empty.to_flat(2)).all())
    assert Population.from_flat(empty.to_flat(2)).mean is None
    batches = _batches(rng, [6, 9], features=2)
    filled = Population()
    filled.update_batches(*_torch_moments(batches))
    whole = np.concatenate(batches)
    for merged in (empty.merge(filled), filled.merge(empty), empty.merge(empty).merge(filled)):
        np.testing.assert_allclose(merged.mean.numpy(), whole.mean(0), rtol=1e-13)
        np.testing.assert_allclose(merged.var.numpy(), whole.var(0, ddof=1), rtol=1e-12)


def test_chan_merge_of_two_empty_sets_is_not_nan():
    zero = torch.zeros(3, dtype=torch.float64)
    mean, m2 = chan_merge(torch.tensor(0.0, dtype=torch.float64), zero, zero, 0.0, zero, zero)
    assert bool(torch.isfinite(mean).all() & torch.isfinite(m2).all())
