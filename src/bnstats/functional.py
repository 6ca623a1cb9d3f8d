"""Batch normalization as pure NumPy functions: moments, forward and backward.

The lecture's notation, for one layer with pre-activations ``z`` (Ioffe & Szegedy 2015)::

    mu     = mean(z)                      over the batch (and spatial positions)
    var    = mean((z - mu)**2)            biased: the one training normalizes with
    z_norm = (z - mu) / sqrt(var + eps)
    z_tilde = gamma * z_norm + beta       gamma = PyTorch's weight, beta = its bias

Inputs are (N, D), or (N, C, ...) with channels on axis 1 and the statistics taken over
every other axis, as PyTorch's BatchNorm1d/2d/3d do. ``count`` is the number of values per
channel, N for (N, D) and N*H*W for (N, C, H, W). Everything is computed in float64 and
returned in the input's dtype.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

DEFAULT_EPS = 1e-5


def reduction_axes(ndim: int) -> tuple[int, ...]:
    """Axes the statistics are taken over: all but the channel axis 1."""
    if ndim < 2:
        raise ValueError(f"batch norm needs input of shape (N, C) or (N, C, ...), got {ndim}-D")
    return (0, *range(2, ndim))


def channel_view(param: np.ndarray, ndim: int) -> np.ndarray:
    """Reshape a per-channel vector (C,) so that it broadcasts over (N, C, ...)."""
    return param.reshape((1, -1) + (1,) * (ndim - 2))


def moments(x: np.ndarray, axes: tuple[int, ...] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel ``mu = mean(z)`` and BIASED ``var = mean((z - mu)**2)`` in float64.

    Two passes (centre, then square), never ``E[z**2] - mu**2``. ``axes`` defaults to every
    axis but the channel axis 1.
    """
    z = np.asarray(x, dtype=np.float64)
    axes = reduction_axes(z.ndim) if axes is None else tuple(axes)
    mu = z.mean(axis=axes, keepdims=True)
    var = np.square(z - mu).mean(axis=axes)
    return mu.reshape(var.shape), var


def count_per_channel(shape: tuple[int, ...]) -> int:
    """Values per channel in a batch of this shape: N, or N * H * W for (N, C, H, W)."""
    return int(np.prod([shape[a] for a in reduction_axes(len(shape))]))


Moments = tuple[np.ndarray, np.ndarray, int]
"""One batch's per-channel ``(mu, var, count)``, ``var`` biased: what an estimator takes."""


class NormCache(Protocol):
    """What a normalization's forward pass leaves behind: its own backward, and the batch
    moments its training step feeds to the estimators, in order."""

    def backward(self, dz_tilde: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]: ...

    def batch_moments(self) -> list[Moments]: ...


@dataclass
class BatchNormCache:
    """What the backward pass needs from the forward pass."""

    z_norm: np.ndarray
    inv_std: np.ndarray
    gamma: np.ndarray
    mu: np.ndarray
    var: np.ndarray
    count: int
    batch_stats: bool

    def backward(self, dz_tilde: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """:func:`batch_norm_backward` of this cache."""
        return batch_norm_backward(dz_tilde, self)

    def batch_moments(self) -> list[Moments]:
        """``[(mu, var, count)]``: the statistics this batch was normalized with."""
        return [(self.mu, self.var, self.count)]


def batch_norm_forward(
    z: np.ndarray,
    gamma: np.ndarray,
    beta: np.ndarray,
    *,
    mu: np.ndarray | None = None,
    var: np.ndarray | None = None,
    eps: float = DEFAULT_EPS,
) -> tuple[np.ndarray, BatchNormCache]:
    """``z_tilde = gamma * (z - mu) / sqrt(var + eps) + beta``.

    With ``mu`` and ``var`` omitted the batch's own (biased) moments are used, as in training;
    given, they are the fixed test-time estimates. Returns ``z_tilde`` and the cache, whose
    ``mu``/``var`` hold the statistics used. Raises ``ValueError`` for ``mu`` without ``var``.
    """
    batch_stats = mu is None
    if batch_stats:
        mu, var = moments(z)
    elif var is None:
        raise ValueError("give both mu and var, or neither")
    return normalize(z, gamma, beta, mu, var, eps=eps, batch_stats=batch_stats)


def normalize(
    z: np.ndarray,
    gamma: np.ndarray,
    beta: np.ndarray,
    mu: np.ndarray,
    var: np.ndarray,
    *,
    eps: float = DEFAULT_EPS,
    batch_stats: bool,
) -> tuple[np.ndarray, BatchNormCache]:
    """:func:`batch_norm_forward` with ``mu`` and ``var`` given; ``batch_stats`` says whether
    they are ``z``'s own moments (then the backward pass differentiates through them)."""
    z64 = np.asarray(z, dtype=np.float64)
    ndim = z64.ndim
    inv_std = 1.0 / np.sqrt(np.asarray(var, dtype=np.float64) + eps)
    z_norm = (z64 - channel_view(np.asarray(mu, np.float64), ndim)) * channel_view(inv_std, ndim)
    gamma64 = np.asarray(gamma, dtype=np.float64)
    z_tilde = channel_view(gamma64, ndim) * z_norm + channel_view(
        np.asarray(beta, np.float64), ndim
    )
    cache = BatchNormCache(
        z_norm=z_norm,
        inv_std=inv_std,
        gamma=gamma64,
        mu=np.asarray(mu),
        var=np.asarray(var),
        count=count_per_channel(z64.shape),
        batch_stats=batch_stats,
    )
    return z_tilde.astype(np.result_type(z, np.float32), copy=False), cache


def batch_norm_backward(
    dz_tilde: np.ndarray, cache: BatchNormCache
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gradients ``(dz, dgamma, dbeta)`` from the upstream gradient ``dz_tilde``.

    ``dbeta = sum(dz_tilde)``, ``dgamma = sum(dz_tilde * z_norm)`` over the reduction axes.
    With batch statistics ``mu`` and ``var`` depend on ``z``, and with ``g = gamma * dz_tilde``::

        dz = inv_std / count * (count * g - sum(g) - z_norm * sum(g * z_norm))

    With fixed statistics (test time) ``dz = g * inv_std``.
    """
    d = np.asarray(dz_tilde, dtype=np.float64)
    ndim = d.ndim
    axes = reduction_axes(ndim)
    dbeta = d.sum(axis=axes)
    dgamma = (d * cache.z_norm).sum(axis=axes)
    g = d * channel_view(cache.gamma, ndim)
    inv_std = channel_view(cache.inv_std, ndim)
    if not cache.batch_stats:
        return g * inv_std, dgamma, dbeta
    n = cache.count
    g_sum = channel_view(g.sum(axis=axes), ndim)
    gz_sum = channel_view((g * cache.z_norm).sum(axis=axes), ndim)
    dz = inv_std / n * (n * g - g_sum - cache.z_norm * gz_sum)
    return dz, dgamma, dbeta
