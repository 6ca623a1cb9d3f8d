"""Batch norm forward/backward: finite differences and PyTorch in float64."""

from __future__ import annotations

import numpy as np
import pytest

from bnstats import functional as F
from tests.gradcheck import numeric_gradient

SHAPES = [(7, 4), (5, 3, 4, 2), (4, 2, 3)]


def _params(rng, channels):
    return rng.normal(1.0, 0.5, channels), rng.normal(0.0, 0.5, channels)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("batch_stats", [True, False])
def test_backward_matches_finite_differences(rng, shape, batch_stats):
    z = rng.normal(2.0, 3.0, shape)
    gamma, beta = _params(rng, shape[1])
    upstream = rng.normal(size=shape)  # a random upstream gradient: sum(z_tilde) has zero dz
    fixed = (
        {} if batch_stats else {"mu": rng.normal(size=shape[1]), "var": rng.random(shape[1]) + 0.5}
    )

    def loss():
        out, _ = F.batch_norm_forward(z, gamma, beta, **fixed)
        return float((out * upstream).sum())

    _, cache = F.batch_norm_forward(z, gamma, beta, **fixed)
    dz, dgamma, dbeta = F.batch_norm_backward(upstream, cache)
    np.testing.assert_allclose(dz, numeric_gradient(loss, z), rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(dgamma, numeric_gradient(loss, gamma), rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(dbeta, numeric_gradient(loss, beta), rtol=1e-6, atol=1e-8)


def test_sum_of_outputs_has_zero_input_gradient(rng):
    """Why gradient checks use a random upstream gradient: d(sum z_tilde)/dz is 0 in training."""
    z = rng.normal(size=(6, 3))
    gamma, beta = _params(rng, 3)
    _, cache = F.batch_norm_forward(z, gamma, beta)
    dz, _, _ = F.batch_norm_backward(np.ones_like(z), cache)
    np.testing.assert_allclose(dz, 0.0, atol=1e-12)


@pytest.mark.parametrize("shape", SHAPES)
def test_forward_and_backward_equal_torch(rng, shape):
    torch = pytest.importorskip("torch")
    z = rng.normal(1.0, 2.0, shape)
    gamma, beta = _params(rng, shape[1])
    upstream = rng.normal(size=shape)
    out, cache = F.batch_norm_forward(z, gamma, beta, eps=1e-5)
    dz, dgamma, dbeta = F.batch_norm_backward(upstream, cache)

    tz = torch.tensor(z, requires_grad=True)
    tg = torch.tensor(gamma, requires_grad=True)
    tb = torch.tensor(beta, requires_grad=True)
    tout = torch.nn.functional.batch_norm(tz, None, None, tg, tb, training=True, eps=1e-5)
    tout.backward(torch.tensor(upstream))
    np.testing.assert_allclose(out, tout.detach().numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dz, tz.grad.numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(dgamma, tg.grad.numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(dbeta, tb.grad.numpy(), rtol=1e-10, atol=1e-12)


def test_moments_are_per_channel_and_biased(rng):
    x = rng.normal(size=(4, 3, 5, 5))
    mean, var = F.moments(x)
    np.testing.assert_allclose(mean, x.mean(axis=(0, 2, 3)))
    np.testing.assert_allclose(var, x.var(axis=(0, 2, 3)))
    assert F.count_per_channel(x.shape) == 100
    assert mean.dtype == np.float64 and var.shape == (3,)


def test_moments_of_float32_with_large_offset(rng):
    x = (1e4 + rng.normal(size=(1000, 2))).astype(np.float32)
    _, var = F.moments(x)
    np.testing.assert_allclose(var, x.astype(np.float64).var(0), rtol=1e-12)


def test_fixed_statistics_forward_is_the_formula(rng):
    z = rng.normal(size=(3, 2))
    gamma, beta = _params(rng, 2)
    mu, var = np.array([0.5, -1.0]), np.array([2.0, 0.25])
    out, _ = F.batch_norm_forward(z, gamma, beta, mu=mu, var=var, eps=1e-3)
    np.testing.assert_allclose(out, gamma * (z - mu) / np.sqrt(var + 1e-3) + beta)


def test_one_dimensional_input_is_rejected():
    with pytest.raises(ValueError, match="shape"):
        F.moments(np.zeros(5))
