"""Ghost Batch Norm in the engine: the split, batch norm per virtual batch (outputs, gradients,
one estimator update per virtual batch), finite differences, torch's BatchNorm1d as a
cross-check, checkpoints."""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest

import bnstats
from bnstats.engine import BatchNorm, BatchRenorm, GhostBatchNorm, Network
from bnstats.ghost import ghost_sizes, ghost_slices

ESTIMATORS = {
    "ema": bnstats.EMA(0.1),
    "ema_debiased": bnstats.EMA(0.3, debias=True),
    "cum": bnstats.CumulativeAverage(),
    "population": bnstats.Population(),
}


@pytest.mark.parametrize(
    ("rows", "ghost", "sizes"),
    [(10, 4, [4, 4, 2]), (9, 4, [4, 5]), (8, 4, [4, 4]), (3, 4, [3]), (4, 4, [4]), (5, 2, [2, 3])],
)
def test_split_keeps_every_row_and_never_leaves_one_alone(rows, ghost, sizes):
    assert ghost_sizes(rows, ghost) == sizes
    slices = ghost_slices(rows, ghost)
    assert [s.stop - s.start for s in slices] == sizes
    assert slices[0].start == 0 and slices[-1].stop == rows


@pytest.mark.parametrize("bad", [1, 0, -3, 2.5, True])
def test_ghost_size_must_be_two_rows_or_more(bad):
    with pytest.raises(ValueError, match=r"GhostBatchNorm 'bn3': ghost_size must be"):
        GhostBatchNorm(4, ghost_size=bad, name="bn3")


def _run_both(rng, ghost_size, rows, shape_tail=(3,), steps=3):
    """A GhostBatchNorm, and a BatchNorm applied to the same virtual batches one by one."""
    ghost = GhostBatchNorm(3, estimators=ESTIMATORS, ghost_size=ghost_size)
    plain = BatchNorm(3, estimators=ESTIMATORS)
    for layer in (ghost, plain):
        layer.params["weight"][:] = [0.5, 1.5, 2.0]
        layer.params["bias"][:] = [0.1, -0.2, 0.3]
    for _ in range(steps):
        x = rng.normal(1.0, 2.0, size=(rows, *shape_tail))
        upstream = rng.normal(size=x.shape)
        out = ghost.forward(x, training=True)
        dx = ghost.backward(upstream)
        expected_out, expected_dx = [], []
        dgamma, dbeta = np.zeros(3), np.zeros(3)
        for part in ghost_slices(rows, ghost_size):
            expected_out.append(plain.forward(x[part], training=True))
            expected_dx.append(plain.backward(upstream[part]))
            dgamma += plain.grads["weight"]
            dbeta += plain.grads["bias"]
        np.testing.assert_array_equal(out, np.concatenate(expected_out))
        np.testing.assert_array_equal(dx, np.concatenate(expected_dx))
        np.testing.assert_allclose(ghost.grads["weight"], dgamma, rtol=1e-14)
        np.testing.assert_allclose(ghost.grads["bias"], dbeta, rtol=1e-14)
    return ghost, plain


@pytest.mark.parametrize(("ghost_size", "rows"), [(4, 10), (4, 9), (2, 8), (16, 12)])
def test_each_virtual_batch_is_batch_norm_with_its_own_update(rng, ghost_size, rows):
    ghost, plain = _run_both(rng, ghost_size, rows)
    for key in ESTIMATORS:
        mine, theirs = ghost.estimators[key], plain.estimators[key]
        np.testing.assert_array_equal(mine.mean, theirs.mean, err_msg=key)
        np.testing.assert_array_equal(mine.var, theirs.var, err_msg=key)
        assert (
            mine.num_batches_tracked
            == theirs.num_batches_tracked
            == 3 * len(ghost_sizes(rows, ghost_size))
        )
    assert ghost.last_ghost_mean.shape == (len(ghost_sizes(rows, ghost_size)), 3)
    np.testing.assert_array_equal(ghost.last_batch_mean, plain.last_batch_mean)


def test_images_split_along_the_batch_axis(rng):
    ghost, plain = _run_both(rng, 2, 5, shape_tail=(3, 2, 2), steps=2)
    assert ghost.estimators["population"].count == plain.estimators["population"].count == 40


def test_gradient_matches_finite_differences(rng):
    layer = GhostBatchNorm(3, ghost_size=4)
    layer.params["weight"][:] = rng.uniform(0.5, 2.0, 3)
    layer.params["bias"][:] = rng.normal(size=3)
    x = rng.normal(0.5, 2.0, size=(11, 3))  # virtual batches of 4, 4, 3
    upstream = rng.normal(size=x.shape)

    def objective() -> float:
        return float((layer.forward(x, training=True, update=[]) * upstream).sum())

    layer.forward(x, training=True, update=[])
    dx = layer.backward(upstream)
    grads = dict(layer.grads)
    for array, analytic in ((x, dx), *((layer.params[k], grads[k]) for k in ("weight", "bias"))):
        numeric = np.zeros_like(array)
        for index in np.ndindex(array.shape):
            saved = array[index]
            array[index] = saved + 1e-6
            plus = objective()
            array[index] = saved - 1e-6
            minus = objective()
            array[index] = saved
            numeric[index] = (plus - minus) / 2e-6
        np.testing.assert_allclose(analytic, numeric, rtol=1e-6, atol=1e-8)


def test_equals_torch_batch_norm_over_each_virtual_batch(rng):
    torch = pytest.importorskip("torch")
    ghost = GhostBatchNorm(3, ghost_size=4)
    bn = torch.nn.BatchNorm1d(3, momentum=0.1).double()
    for _ in range(3):
        x = rng.normal(2.0, 3.0, size=(10, 3))
        upstream = rng.normal(size=x.shape)
        out = ghost.forward(x, training=True)
        dx = ghost.backward(upstream)
        xt = torch.from_numpy(x).requires_grad_(True)
        bn.zero_grad()
        tout = torch.cat([bn(chunk) for chunk in xt.split([4, 4, 2])])
        tout.backward(torch.from_numpy(upstream))
        np.testing.assert_allclose(out, tout.detach().numpy(), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(dx, xt.grad.numpy(), rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(ghost.grads["weight"], bn.weight.grad.numpy(), rtol=1e-10)
        np.testing.assert_allclose(ghost.grads["bias"], bn.bias.grad.numpy(), rtol=1e-10)
    ema = ghost.estimators["ema"]
    np.testing.assert_allclose(ema.mean, bn.running_mean.numpy(), rtol=1e-12)
    np.testing.assert_allclose(ema.var, bn.running_var.numpy(), rtol=1e-12)
    assert ema.num_batches_tracked == int(bn.num_batches_tracked) == 9


def test_test_time_is_batch_norm_with_the_estimate(rng):
    ghost = GhostBatchNorm(3, ghost_size=2)
    ghost.forward(rng.normal(size=(8, 3)), training=True)
    x = rng.normal(size=(5, 3))
    upstream = rng.normal(size=x.shape)
    plain = BatchNorm(3)
    plain.estimators = ghost.estimators
    np.testing.assert_array_equal(ghost.forward(x), plain.forward(x))
    np.testing.assert_array_equal(ghost.backward(upstream), plain.backward(upstream))
    np.testing.assert_array_equal(ghost.forward(x[:1]), plain.forward(x)[:1])


def test_non_finite_virtual_batch_updates_no_estimator(rng):
    layer = GhostBatchNorm(3, ghost_size=2, name="bn4")
    x = rng.normal(size=(6, 3))
    x[5, 1] = np.nan
    with (
        pytest.raises(bnstats.NonFiniteStatisticsError, match="'bn4'"),
        np.errstate(invalid="ignore"),
    ):
        layer.forward(x, training=True)
    assert layer.estimators["ema"].num_batches_tracked == 0
    skipping = GhostBatchNorm(
        3, ghost_size=2, estimators={"ema": bnstats.EMA(0.1, nonfinite="skip")}
    )
    with np.errstate(invalid="ignore"):
        skipping.forward(x, training=True)
    ema = skipping.estimators["ema"]
    assert (ema.num_batches_tracked, ema.num_batches_skipped) == (2, 1)  # the other two taken


def test_network_with_ghosts_round_trips(rng, tmp_path):
    with pytest.raises(TypeError, match="ghost_size"):
        Network.mlp([5, 6, 3], norm=GhostBatchNorm)
    with pytest.raises(TypeError, match="ghost_size"):
        Network.mlp([5, 6, 3], norm=partial(BatchRenorm, ghost_size=4))
    with pytest.raises(TypeError, match="norm must be a layer class.*got 'ghost'"):
        Network.mlp([5, 6, 3], norm="ghost")
    net = Network.mlp([5, 6, 3], seed=0, norm=partial(GhostBatchNorm, ghost_size=4))
    X, y = rng.normal(size=(40, 5)), rng.integers(0, 3, size=40)
    net.fit(X, y, epochs=1, batch_size=10)
    (layer,) = net.batchnorm_layers
    assert layer.name == "bn1" and layer.estimators["ema"].num_batches_tracked == 4 * 3
    loaded = Network.load(net.save(tmp_path / "ghost.npz"))
    assert isinstance(loaded.layers[1], GhostBatchNorm) and loaded.layers[1].ghost_size == 4
    np.testing.assert_array_equal(loaded.logits(X), net.logits(X))
    np.testing.assert_array_equal(
        loaded.forward(X[:10], training=True), net.forward(X[:10], training=True)
    )
