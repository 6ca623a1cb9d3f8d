"""Batch Renormalization in the engine: the schedule, batch norm as its special case, the
gradient with r and d held constant (finite differences), what r and d do to the gradient,
torch's autograd as a cross-check, and checkpoints."""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest

import bnstats
from bnstats.engine import Adam, BatchNorm, BatchRenorm, Network
from bnstats.renorm import (
    RenormSchedule,
    batch_renorm_backward,
    batch_renorm_forward,
    renorm_correction,
)
from tests.gradcheck import numeric_gradient

BN_LIKE = RenormSchedule(rmax=1.0, dmax=0.0)
WIDE = RenormSchedule.constant(rmax=1e6, dmax=1e6)  # never clips


def _warm_layer(rng, schedule, features=4, steps=3, **kwargs) -> BatchRenorm:
    """A BatchRenorm whose estimators have taken a few batches (so r, d are not 1, 0)."""
    layer = BatchRenorm(features, schedule=schedule, name="bn7", **kwargs)
    for _ in range(steps):
        layer.forward(rng.normal(1.0, 2.0, size=(6, features)), training=True)
    return layer


def test_paper_schedule_milestones():
    paper = RenormSchedule()
    assert paper.limits(0) == paper.limits(4999) == paper.limits(5000) == (1.0, 0.0)
    assert paper.limits(25000) == pytest.approx((1 + 2 * 20000 / 35000, 5.0))
    assert paper.limits(40000) == paper.limits(10**6) == (3.0, 5.0)
    assert paper.limits(15000) == pytest.approx((1 + 2 * 10000 / 35000, 5 * 10000 / 20000))
    small = paper.scaled_to(400)
    assert (small.warmup_steps, small.dmax_full_at, small.rmax_full_at) == (25, 125, 200)
    assert small.limits(200) == (3.0, 5.0) and small.limits(24) == (1.0, 0.0)
    assert RenormSchedule.constant(2.0, 1.0).limits(0) == (2.0, 1.0)
    assert BN_LIKE.limits(10**6) == (1.0, 0.0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"rmax": 0.5}, "rmax must be at least 1"), ({"dmax": -1}, "dmax must be at least 0")],
)
def test_schedule_refuses_impossible_limits(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RenormSchedule(**kwargs)
    with pytest.raises(ValueError, match="warmup_steps"):
        RenormSchedule(warmup_steps=-1)


def test_correction_clips_to_the_limits(rng):
    mu, var = rng.normal(size=50) * 3, rng.uniform(0.01, 10, size=50)
    running_mean, running_var = rng.normal(size=50), rng.uniform(0.01, 10, size=50)
    r, d = renorm_correction(mu, var, running_mean, running_var, 1e-5, 2.0, 0.5)
    raw_r = np.sqrt(var + 1e-5) / np.sqrt(running_var + 1e-5)
    raw_d = (mu - running_mean) / np.sqrt(running_var + 1e-5)
    np.testing.assert_allclose(r, np.clip(raw_r, 0.5, 2.0), rtol=1e-14)
    np.testing.assert_allclose(d, np.clip(raw_d, -0.5, 0.5), rtol=1e-14)
    assert (r == 2.0).any() and (r == 0.5).any() and ((r > 0.5) & (r < 2.0)).any()


def test_unclipped_training_output_is_the_inference_output(rng):
    layer = _warm_layer(rng, WIDE)
    ema = layer.estimators["ema"]
    mean, var = ema.mean.copy(), ema.var.copy()
    layer.params["weight"][:] = rng.uniform(0.5, 2, 4)
    layer.params["bias"][:] = rng.normal(size=4)
    z = rng.normal(1.0, 2.0, size=(5, 4))
    out = layer.forward(z, training=True)
    expected = layer.params["weight"] * (z - mean) / np.sqrt(var + layer.eps) + layer.params["bias"]
    np.testing.assert_allclose(out, expected, rtol=1e-12, atol=1e-12)
    assert not np.allclose(layer.estimators["ema"].mean, mean), "the estimators moved after"


def test_rmax_1_dmax_0_is_batch_norm_exactly(rng):
    estimators = {"ema": bnstats.EMA(0.1), "cum": bnstats.CumulativeAverage()}
    renorm = BatchRenorm(5, schedule=BN_LIKE, estimators=estimators)
    plain = BatchNorm(5, estimators=estimators)
    for step in range(4):
        z = rng.normal(2.0, 3.0, size=(7 + step, 5))
        upstream = rng.normal(size=z.shape)
        np.testing.assert_array_equal(
            renorm.forward(z, training=True), plain.forward(z, training=True)
        )
        np.testing.assert_array_equal(renorm.backward(upstream), plain.backward(upstream))
        for key in ("weight", "bias"):
            np.testing.assert_allclose(renorm.grads[key], plain.grads[key], rtol=1e-14)
    for key in estimators:
        np.testing.assert_array_equal(renorm.estimators[key].mean, plain.estimators[key].mean)
        np.testing.assert_array_equal(renorm.estimators[key].var, plain.estimators[key].var)
    np.testing.assert_array_equal(renorm.last_r, np.ones(5))
    np.testing.assert_array_equal(renorm.last_d, np.zeros(5))


@pytest.mark.parametrize("shape", [(6, 3), (4, 3, 2, 3)])
def test_backward_with_r_d_frozen_matches_finite_differences(rng, shape):
    z = rng.normal(0.5, 2.0, size=shape)
    gamma, beta = rng.uniform(0.5, 2.0, 3), rng.normal(size=3)
    r, d = rng.uniform(0.4, 2.5, 3), rng.normal(size=3)
    upstream = rng.normal(size=shape)

    def objective() -> float:
        return float((batch_renorm_forward(z, gamma, beta, r, d)[0] * upstream).sum())

    _, cache = batch_renorm_forward(z, gamma, beta, r, d)
    dz, dgamma, dbeta = batch_renorm_backward(upstream, cache)
    np.testing.assert_allclose(dz, numeric_gradient(objective, z), rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(dgamma, numeric_gradient(objective, gamma), rtol=1e-6)
    np.testing.assert_allclose(dbeta, numeric_gradient(objective, beta), rtol=1e-6)


def test_layer_backward_is_the_frozen_r_d_gradient(rng):
    layer = _warm_layer(rng, RenormSchedule.constant(1.3, 0.2))
    z = rng.normal(1.0, 2.5, size=(6, 4))
    upstream = rng.normal(size=z.shape)
    layer.forward(z, training=True, update=[])
    dz = layer.backward(upstream)
    r, d = layer.last_r, layer.last_d
    assert ((r > 1 / 1.3) & (r < 1.3)).any() or (np.abs(d) < 0.2).any(), "some r or d unclipped"
    gamma, beta = layer.params["weight"], layer.params["bias"]

    def frozen() -> float:
        return float((batch_renorm_forward(z, gamma, beta, r, d)[0] * upstream).sum())

    np.testing.assert_allclose(dz, numeric_gradient(frozen, z), rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(layer.grads["weight"], numeric_gradient(frozen, gamma), 1e-6)


def _full_forward_differences(layer: BatchRenorm, z: np.ndarray, upstream: np.ndarray):
    """Finite differences through the whole training forward: r and d move with z (the
    estimators do not: update=[])."""

    def full() -> float:
        return float((layer.forward(z, training=True, update=[]) * upstream).sum())

    return numeric_gradient(full, z)


def test_gradient_flows_only_through_the_batch_norm_path(rng):
    z = rng.normal(1.0, 2.0, size=(6, 4))
    upstream = rng.normal(size=z.shape)
    # Unclipped: the forward is (z - mu) / sigma with the running mu, sigma, whose true
    # derivative is gamma / sigma per element. The stop-gradient backward is not that.
    wide = _warm_layer(rng, WIDE)
    wide.forward(z, training=True, update=[])
    dz = wide.backward(upstream)
    sigma = np.sqrt(wide.estimators["ema"].var + wide.eps)
    full = _full_forward_differences(wide, z, upstream)
    np.testing.assert_allclose(full, upstream * wide.params["weight"] / sigma, rtol=1e-6)
    assert not np.allclose(dz, full, rtol=1e-3), "r, d must not pass gradient"
    # Clipped everywhere: r, d are locally constant, so the full derivative is the backward's.
    tight = _warm_layer(rng, RenormSchedule.constant(1.0 + 1e-9, 1e-9), steps=1)
    tight.estimators["ema"].load_state_dict(
        {**tight.estimators["ema"].state_dict(), "running_mean": np.full(4, 50.0)}
    )
    tight.forward(z, training=True, update=[])
    assert np.all(np.abs(tight.last_d) == 1e-9)
    dz_tight = tight.backward(upstream)
    full_tight = _full_forward_differences(tight, z, upstream)
    np.testing.assert_allclose(dz_tight, full_tight, rtol=1e-5, atol=1e-7)


def test_first_batch_has_nothing_to_correct_toward(rng):
    layer = BatchRenorm(3, schedule=RenormSchedule.constant(3.0, 5.0))
    layer.forward(rng.normal(5.0, 3.0, size=(4, 3)), training=True)
    np.testing.assert_array_equal(layer.last_r, np.ones(3))
    layer.forward(rng.normal(5.0, 3.0, size=(4, 3)), training=True)
    assert not np.allclose(layer.last_r, 1.0)


def test_schedule_clock_is_the_reference_estimator(rng):
    estimators = {"ema": bnstats.EMA(0.1), "population": bnstats.Population()}
    schedule = RenormSchedule(rmax=3.0, dmax=5.0, warmup_steps=2, rmax_full_at=4, dmax_full_at=4)
    layer = BatchRenorm(3, estimators=estimators, schedule=schedule, reference="population")
    for step in range(5):
        layer.forward(rng.normal(3.0, 2.0, size=(3, 3)), training=True)
        rmax, dmax = schedule.limits(step)
        assert np.all(layer.last_r <= rmax + 1e-15) and np.all(np.abs(layer.last_d) <= dmax)
    assert layer.step == 5
    pop = layer.estimators["population"]
    layer.forward(rng.normal(size=(4, 3)), training=True, update=[layer.estimators["ema"]])
    assert layer.step == 5, "the clock follows the reference estimator only"
    raw_d = (layer.last_batch_mean - pop.mean) / np.sqrt(pop.var + layer.eps)
    np.testing.assert_allclose(layer.last_d, np.clip(raw_d, -5, 5), rtol=1e-12)
    with pytest.raises(ValueError, match=r"'bn9'.*reference 'nope'.*\['ema', 'population'\]"):
        BatchRenorm(3, estimators=estimators, reference="nope", name="bn9")


def test_batch_of_one_row_names_the_layer():
    layer = BatchRenorm(3, name="bn2")
    with pytest.raises(ValueError, match=r"BatchRenorm 'bn2'.*\(1, 3\)"):
        layer.forward(np.ones((1, 3)), training=True)


def test_network_round_trips_through_a_checkpoint(rng, tmp_path):
    schedule = RenormSchedule(rmax=2.0, dmax=1.0, warmup_steps=1, rmax_full_at=6, dmax_full_at=4)
    net = Network.mlp([5, 6, 3], seed=0, norm=partial(BatchRenorm, schedule=schedule))
    X, y = rng.normal(size=(40, 5)), rng.integers(0, 3, size=40)
    net.fit(X, y, epochs=1, batch_size=10)
    loaded = Network.load(net.save(tmp_path / "renorm.npz"))
    (layer,) = loaded.batchnorm_layers
    assert isinstance(layer, BatchRenorm) and layer.name == "bn1"
    assert layer.schedule == schedule and layer.step == 4
    np.testing.assert_array_equal(loaded.logits(X), net.logits(X))
    batch = X[:10]
    np.testing.assert_array_equal(
        loaded.forward(batch, training=True), net.forward(batch, training=True)
    )


def test_recalibrate_and_test_time_are_batch_norm(rng):
    net = Network.mlp(
        [5, 8, 3], seed=1, norm=partial(BatchRenorm, schedule=RenormSchedule.constant(2, 1))
    )
    X, y = rng.normal(size=(48, 5)), rng.integers(0, 3, size=48)
    net.fit(X, y, epochs=2, batch_size=8, optimizer=Adam(1e-2))
    net.recalibrate(X, batch_size=16)
    z1 = X @ net.layers[0].params["weight"].T
    population = net.batchnorm_layers[0].estimators["population"]
    np.testing.assert_allclose(population.mean, z1.mean(0), rtol=1e-12)
    np.testing.assert_allclose(population.var, z1.var(0, ddof=1), rtol=1e-12)
    for stats in ("ema", "population"):
        np.testing.assert_allclose(
            net.logits(X, stats=stats, batch_size=1), net.logits(X, stats=stats), rtol=1e-12
        )


def test_engine_equals_torch_autograd_in_float64(rng):
    """Five training steps of an MLP with BatchRenorm against bnstats.torch.BatchRenorm1d,
    whose gradient comes from torch's autograd (r, d under no_grad)."""
    torch = pytest.importorskip("torch")
    from bnstats.torch.renorm import BatchRenorm1d

    schedule = RenormSchedule(rmax=2.0, dmax=1.0, warmup_steps=1, rmax_full_at=3, dmax_full_at=2)
    net = Network.mlp([6, 8, 3], seed=2, norm=partial(BatchRenorm, schedule=schedule))
    lin1, bn, _, lin2 = net.layers
    twin = torch.nn.Sequential(
        torch.nn.Linear(6, 8, bias=False),
        BatchRenorm1d(8, schedule=schedule),
        torch.nn.ReLU(),
        torch.nn.Linear(8, 3),
    ).double()
    with torch.no_grad():
        twin[0].weight.copy_(torch.from_numpy(lin1.params["weight"]))
        twin[3].weight.copy_(torch.from_numpy(lin2.params["weight"]))
        twin[3].bias.copy_(torch.from_numpy(lin2.params["bias"]))
    optimizer, torch_optimizer = Adam(0.05), torch.optim.Adam(twin.parameters(), lr=0.05)
    for step in range(5):
        x = rng.normal(0.5, 2.0, size=(5 + step, 6))
        upstream = rng.normal(size=(len(x), 3))
        out = net.forward(x, training=True)
        net.backward(upstream)
        torch_optimizer.zero_grad()
        tout = twin(torch.from_numpy(x))
        tout.backward(torch.from_numpy(upstream))
        np.testing.assert_allclose(out, tout.detach().numpy(), rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(bn.last_r, twin[1].last_r.numpy(), rtol=1e-12)
        np.testing.assert_allclose(bn.last_d, twin[1].last_d.numpy(), rtol=1e-12, atol=1e-14)
        for (name, _, grad), param in zip(net.parameters(), twin.parameters(), strict=True):
            np.testing.assert_allclose(
                grad, param.grad.numpy(), rtol=1e-9, atol=1e-12, err_msg=name
            )
        optimizer.step(net.parameters())
        torch_optimizer.step()
    assert not np.allclose(bn.last_r, 1.0), "the correction was active"
    np.testing.assert_allclose(bn.estimators["ema"].mean, twin[1].running_mean.numpy(), 1e-10)
    np.testing.assert_allclose(bn.estimators["ema"].var, twin[1].running_var.numpy(), 1e-10)
    assert bn.step == int(twin[1].num_batches_tracked) == 5


def test_batch_moments_are_computed_once_per_step(rng, monkeypatch):
    from bnstats import functional as F

    calls = []
    moments = F.moments
    monkeypatch.setattr(F, "moments", lambda *a, **k: calls.append(1) or moments(*a, **k))
    layer = BatchRenorm(3, schedule=RenormSchedule.constant(2, 1))
    for _ in range(3):
        layer.forward(rng.normal(size=(8, 3)), training=True)
    assert len(calls) == 3
