"""Engine layers on their own: estimators side by side, non-finite batches, layouts."""

from __future__ import annotations

import numpy as np
import pytest

import bnstats
from bnstats.engine import BatchNorm, Linear, ReLU


def test_estimators_are_copied_per_layer(rng):
    template = {"ema": bnstats.EMA(0.1)}
    a, b = BatchNorm(3, estimators=template), BatchNorm(3, estimators=template)
    a.forward(rng.normal(size=(4, 3)), training=True)
    assert a.estimators["ema"].count == 4
    assert b.estimators["ema"].count == 0 and template["ema"].count == 0


def test_every_estimator_sees_the_same_batches(rng):
    bn = BatchNorm(
        3,
        estimators={
            "ema": bnstats.EMA(0.1),
            "ema_debiased": bnstats.EMA(0.1, debias=True),
            "cumulative": bnstats.CumulativeAverage(),
            "population": bnstats.Population(),
        },
        name="bn",
    )
    batches = [rng.normal(2.0, 1.5, size=(8, 3)) for _ in range(5)]
    for batch in batches:
        bn.forward(batch, training=True)
    data = np.concatenate(batches)
    np.testing.assert_allclose(bn.estimators["population"].var, data.var(0, ddof=1))
    np.testing.assert_allclose(
        bn.estimators["cumulative"].mean, np.mean([b.mean(0) for b in batches], 0)
    )
    assert {e.num_batches_tracked for e in bn.estimators.values()} == {5}


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")
def test_nonfinite_batch_raises_with_layer_name_and_moves_nothing(rng):
    bn = BatchNorm(2, estimators={"a": bnstats.EMA(), "b": bnstats.Population()}, name="bn7")
    bn.forward(rng.normal(size=(4, 2)), training=True)
    x = rng.normal(size=(4, 2))
    x[0, 1] = np.inf
    with pytest.raises(bnstats.NonFiniteStatisticsError, match="bn7"):
        bn.forward(x, training=True)
    assert all(
        np.isfinite(e.var).all() and e.num_batches_tracked == 1 for e in bn.estimators.values()
    )


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")
def test_nonfinite_batch_can_be_skipped(rng):
    bn = BatchNorm(2, estimators={"ema": bnstats.EMA(nonfinite="skip")}, name="bn")
    bn.forward(rng.normal(size=(4, 2)), training=True)
    x = np.full((4, 2), np.nan)
    bn.forward(x, training=True)
    assert bn.estimators["ema"].num_batches_skipped == 1
    assert np.isfinite(bn.estimators["ema"].var).all()


def test_batchnorm_on_image_layout(rng):
    bn = BatchNorm(3, estimators={"population": bnstats.Population()}, name="bn")
    x = rng.normal(size=(2, 3, 4, 5))
    out = bn.forward(x, training=True)
    np.testing.assert_allclose(out.mean(axis=(0, 2, 3)), 0, atol=1e-12)
    assert bn.estimators["population"].count == 40


def test_linear_and_relu_backward(rng):
    lin = Linear(3, 2, rng=rng, name="lin")
    x, d = rng.normal(size=(5, 3)), rng.normal(size=(5, 2))
    lin.forward(x)
    dx = lin.backward(d)
    np.testing.assert_allclose(lin.grads["weight"], d.T @ x)
    np.testing.assert_allclose(dx, d @ lin.params["weight"])
    relu = ReLU()
    out = relu.forward(np.array([[-1.0, 2.0]]))
    np.testing.assert_array_equal(out, [[0.0, 2.0]])
    np.testing.assert_array_equal(relu.backward(np.array([[5.0, 5.0]])), [[0.0, 5.0]])


def test_batchnorm_needs_an_estimator():
    with pytest.raises(ValueError, match="at least one estimator"):
        BatchNorm(3, estimators={})


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")
def test_estimator_update_is_all_or_nothing(rng):
    """The first estimator takes the batch (it skips NaN), the second refuses it: the layer
    gives the first its state back, so no estimator moves."""
    bn = BatchNorm(
        2,
        estimators={"skip": bnstats.EMA(nonfinite="skip"), "strict": bnstats.EMA()},
        name="bn3",
    )
    bn.forward(rng.normal(size=(4, 2)), training=True)
    before = {key: est.state_dict() for key, est in bn.estimators.items()}
    with pytest.raises(bnstats.NonFiniteStatisticsError, match="BatchNorm 'bn3': EMA"):
        bn.forward(np.full((4, 2), np.nan), training=True)
    for key, est in bn.estimators.items():
        after = est.state_dict()
        assert after["num_batches_skipped"] == before[key]["num_batches_skipped"] == 0
        np.testing.assert_array_equal(after["running_mean"], before[key]["running_mean"])


def test_backward_follows_the_last_forward(rng):
    """Each forward leaves a cache that knows its own backward: training (batch statistics)
    and test time (fixed statistics) differ."""
    bn = BatchNorm(3, name="bn")
    x, upstream = rng.normal(size=(6, 3)), rng.normal(size=(6, 3))
    bn.forward(x, training=True)
    train_dx = bn.backward(upstream)
    bn.forward(x)
    test_dx = bn.backward(upstream)
    _, var = bn.statistics()
    np.testing.assert_allclose(test_dx, upstream / np.sqrt(var + bn.eps))
    assert not np.allclose(train_dx, test_dx)
