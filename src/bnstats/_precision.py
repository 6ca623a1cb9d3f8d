"""How precise a population estimate is, from the spread between the batches that made it.

Array-agnostic (plain arithmetic, NumPy arrays and torch tensors alike), so that every
framework's pass judges its estimate with the same formulas. A layer's pass keeps, beside
its :class:`bnstats.Population` of every value, a ``spread`` Population of per-batch values
(3C of them), each batch ``k`` weighing its ``n_k`` values per channel::

    [mean_k,  u_k,  mean_k + u_k],    u_k = m2_k / n_k + (mean_k - center)**2

``u_k`` is batch k's mean of ``(z - center)**2``, ``center`` any fixed value near the mean
(the layer's stored mean when the pass began keeps the sums well conditioned). The spread's
``m2`` then holds ``S_mm = sum n_k (mean_k - mu)**2``, ``S_uu`` and ``S_mm + S_uu + 2 S_um``.
"""

from __future__ import annotations

import math

import numpy as np

from bnstats._array import Array, concat
from bnstats.stats import Population

_TINY = float(np.finfo(np.float64).tiny)


def spread_rows(counts: Array, means: Array, m2s: Array, center: Array | float) -> Array:
    """The rows ``[mean_k, u_k, mean_k + u_k]`` (B, 3C) of batches with ``counts`` (B,) values
    per channel, per-channel ``means`` and ``m2s`` (B, C); a batch of count 0 gives finite
    rows (it weighs nothing)."""
    deviation = means - center
    u = m2s / counts.clip(min=1)[:, None] + deviation * deviation
    return concat([means, u, means + u], axis=1)


def standard_errors(
    population: Population, spread: Population, center: Array | float, finite_batches: int
) -> tuple[Array, Array] | None:
    """Per channel, the standard errors of the population ``mean`` and unbiased ``var`` from
    the spread between the ``B = finite_batches`` batches (each batch one draw of ``n_k``
    values, ``N = sum n_k``; the linearization of a ratio estimator, as in cluster sampling)::

        se_mean**2 = S_mm / (N * (B - 1))
        se_var**2  = (S_uu - 4 a S_um + 4 a**2 S_mm) / (N * (B - 1)) * (N / (N - 1))**2

    with ``a = mu - center``: ``u_k - 2 a mean_k`` is, up to a constant, batch k's mean of
    ``(z - mu)**2``, whose spread gives the variance's; ``S_um`` comes from the spread of
    ``mean_k + u_k``. ``None`` with fewer than 2 batches (the errors are infinite)."""
    if finite_batches < 2 or population.mean is None or spread.m2 is None:
        return None
    channels = population.mean.shape[0]
    count = population.count
    s_mm = spread.m2[:channels]
    s_uu = spread.m2[channels : 2 * channels]
    s_um = (spread.m2[2 * channels :] - s_mm - s_uu) / 2
    a = population.mean - center
    scale = count * (finite_batches - 1)
    se_mean = (s_mm / scale).clip(min=0) ** 0.5
    var_spread = (s_uu - 4 * a * s_um + 4 * a * a * s_mm).clip(min=0) / scale
    se_var = var_spread**0.5 * (count / (count - 1))
    return se_mean, se_var


def relative_error(population: Population, se_mean: Array, se_var: Array) -> Array:
    """The worst channel's relative standard error: the larger of ``se_mean / sqrt(var)`` and
    ``se_var / var`` (the mean is judged against the spread of the values, as it may be 0);
    NaN counts as infinite. A 0-d value of the inputs' kind."""
    var = population.m2 / (population.count - 1)
    safe = var.clip(min=_TINY)
    ratios = concat([se_mean / safe**0.5, se_var / safe])
    ratios[ratios != ratios] = math.inf
    return ratios.max()


__all__ = ["relative_error", "spread_rows", "standard_errors"]
