"""How precise a :class:`~bnstats.stats.Population` is, from the spread between its batches.

Each batch ``k`` is one draw of ``n_k`` values per channel; how far the batches' own means
and variances scatter around the pooled ones gives the standard errors of the pooled
``mean`` and unbiased ``var`` (:class:`BatchSpread`), and from those standard errors, how
likely it is that some estimate lies farther than a tolerance from its truth
(:func:`miss_probability`, the union bound over every channel's estimates). Plain
arithmetic: NumPy arrays and torch tensors alike, without host reads for tensors.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from bnstats._array import (
    Array,
    clamp_min,
    column,
    concat,
    is_torch,
    largest,
    like,
    normal_tail,
    where,
    widen,
    zeros_like,
)
from bnstats.stats import Population


class BatchSpread:
    """The spread between the batches of a :class:`Population`: the standard errors of its
    ``mean`` and unbiased ``var``, each batch ``k`` one draw of ``n_k`` values per channel.

    It keeps ``values``, a Population of per-batch values (3C of them), each batch weighing
    its ``n_k``::

        [mean_k,  u_k,  mean_k + u_k],    u_k = m2_k / n_k + (mean_k - center)**2

    ``u_k`` is batch k's mean of ``(z - center)**2``; ``center`` is any fixed per-channel
    value, as long as it is close to the data: :meth:`standard_errors` subtracts terms that
    grow as ``(mu - center)**2``, so a center 1e4 standard deviations off loses the variance's
    standard error to rounding. So the first batches merged (:meth:`update_batches`) move the
    center to their mean (where finite; None is 0 until then), and :meth:`merge` moves the
    other side's values to this side's center. ``values.m2`` then holds
    ``S_mm = sum n_k (mean_k - mu)**2``,
    ``S_uu`` and ``S_mm + S_uu + 2 S_um`` (:meth:`standard_errors` has the formulas). Plain
    arithmetic: NumPy arrays and torch tensors alike, without host reads for tensors.
    """

    def __init__(self, center: Array | None = None) -> None:
        self.center = center
        self.values = Population()

    def update_batches(self, counts: Any, means: Array, m2s: Array) -> None:
        """Merge batches ``k``: ``counts`` (B,) values per channel, ``means`` and ``m2s`` (B, C),
        as :meth:`Population.update_batches` takes them (a batch of count 0 weighs nothing).
        The first batches merged set the center (:meth:`center_on` their mean)."""
        if self.values.mean is None:
            means = widen(means)
            weights = column(counts, means)
            total = weights.sum()
            if not is_torch(weights) and not total > 0:
                return
            self.center_on((weights * means).sum(0) / total)
        values = self.batch_values(counts, means, m2s)
        self.values.update_batches(counts, values, zeros_like(values))

    def center_on(self, block_mean: Array) -> None:
        """Before any batch is merged: the center becomes ``block_mean`` (the mean of the first
        batches, per channel) where it is finite, and stays where it is not."""
        if self.values.mean is not None:
            return
        block_mean = widen(block_mean)
        kept = zeros_like(block_mean) if self.center is None else like(self.center, block_mean)
        finite = block_mean.isfinite() if is_torch(block_mean) else np.isfinite(block_mean)
        self.center = where(finite, block_mean, kept)

    def batch_values(self, counts: Any, means: Array, m2s: Array) -> Array:
        """Each batch's ``[mean_k, u_k, mean_k + u_k]`` (B, 3C), ``u_k = m2_k / n_k +
        (mean_k - center)**2``; ``counts`` (B,) or per channel (B, C)."""
        center = 0.0 if self.center is None else like(self.center, means)
        deviation = means - center
        u = m2s / clamp_min(column(counts, means), 1) + deviation * deviation
        return concat([means, u, means + u], axis=1)

    def merge(self, other: BatchSpread) -> BatchSpread:
        """The spread of the batches of both (``self``'s center, ``other``'s values moved to
        it: :meth:`recentered`); neither changes."""
        if self.values.mean is None:  # nothing here yet: other's batches around its center
            merged = BatchSpread(other.center)
            merged.values = self.values.merge(other.values)
            return merged
        merged = BatchSpread(self.center)
        merged.values = self.values.merge(other.recentered(self.center).values)
        return merged

    def recentered(self, center: Array | None) -> BatchSpread:
        """The same batches' spread around ``center``: each batch's ``u_k`` moves exactly, by
        ``(mean_k - center)**2 - (mean_k - old)**2 = 2 d mean_k - d (center + old)`` with
        ``d = old - center``, so the pooled values and spreads move as::

            U' = U + 2 d M + k,   S' = S + 2 d M + k,     k = -d (center + old)
            S_uu' = S_uu + 4 d S_um + 4 d**2 S_mm,   S_ss' = S_ss + 4 d (S_mm + S_um) + 4 d**2 S_mm

        (``M``, ``U``, ``S`` the pooled ``mean_k``, ``u_k``, ``mean_k + u_k``)."""
        moved = BatchSpread(center)
        values = self.values
        if values.mean is None:
            moved.values = values
            return moved
        mean, m2 = values.mean, values.m2
        c = mean.shape[0] // 3
        old = zeros_like(mean[:c]) if self.center is None else like(self.center, mean)
        new = zeros_like(mean[:c]) if center is None else like(center, mean)
        d = old - new
        m_mean, u_mean, s_mean = mean[:c], mean[c : 2 * c], mean[2 * c :]
        s_mm, s_uu, s_ss = m2[:c], m2[c : 2 * c], m2[2 * c :]
        s_um = (s_ss - s_mm - s_uu) / 2
        shift = 2 * d * m_mean - d * (new + old)
        moved.values = values._replaced(
            concat([m_mean, u_mean + shift, s_mean + shift]),
            concat(
                [
                    s_mm,
                    s_uu + 4 * d * s_um + 4 * d * d * s_mm,
                    s_ss + 4 * d * (s_mm + s_um) + 4 * d * d * s_mm,
                ]
            ),
        )
        return moved

    def to_flat(self, channels: int) -> Array:
        """:meth:`Population.to_flat` of ``values`` (``2 + 6 * channels`` numbers)."""
        return self.values.to_flat(3 * channels)

    @classmethod
    def from_flat(cls, flat: Array, center: Array | None = None) -> BatchSpread:
        """The BatchSpread of :meth:`to_flat`'s vector, around ``center``."""
        spread = cls(center)
        spread.values = Population.from_flat(flat)
        return spread

    def standard_errors(self, population: Population, batches: int) -> tuple[Array, Array]:
        """Per channel, the standard errors of ``population``'s ``mean`` and unbiased ``var``
        from the spread between its ``B = batches`` batches (``N = sum n_k`` values; the
        linearization of a ratio estimator, as in cluster sampling)::

            se_mean**2 = S_mm / (N * (B - 1))
            se_var**2  = (S_uu - 4 a S_um + 4 a**2 S_mm) / (N * (B - 1)) * (N / (N - 1))**2

        with ``a = mu - center``: ``u_k - 2 a mean_k`` is, up to a constant, batch k's mean of
        ``(z - mu)**2``, whose spread gives the variance's; ``S_um`` comes from the spread of
        ``mean_k + u_k``. Infinite with fewer than 2 batches. ``population`` must hold the
        same batches (not empty)."""
        mean, spread = population.mean, self.values.m2
        one_number = isinstance(batches, (int, float))
        if spread is None or (one_number and batches < 2):
            infinite = zeros_like(mean) + math.inf
            return infinite, infinite
        channels = mean.shape[0]
        s_mm, s_uu, s_sum = (
            spread[:channels],
            spread[channels : 2 * channels],
            spread[2 * channels :],
        )
        s_um = (s_sum - s_mm - s_uu) / 2
        a = mean - (0.0 if self.center is None else like(self.center, s_mm))
        count = population.count
        scale = count * (batches - 1)
        se_mean = clamp_min(s_mm / scale, 0) ** 0.5
        var_spread = clamp_min(s_uu - 4 * a * s_um + 4 * a * a * s_mm, 0) / scale
        se_var = var_spread**0.5 * (count / (count - 1))
        if not one_number:  # per channel: infinite where fewer than 2 batches
            se_mean, se_var = (
                where(batches >= 2, se_mean, math.inf),
                where(batches >= 2, se_var, math.inf),
            )
        return se_mean, se_var

    def relative_standard_errors(self, population: Population, batches: Any) -> Array:
        """Per channel, ``[se_mean / sqrt(var), se_var / var]`` (2, C): the standard errors
        relative to the spread of the values (the mean may be 0) and to the variance.
        ``batches`` and ``population.count`` may be numbers or per-channel arrays (the
        channels of many layers side by side)."""
        se_mean, se_var = self.standard_errors(population, batches)
        var = clamp_min(population.m2 / (population.count - 1), np.finfo(np.float64).tiny)
        return concat([se_mean / var**0.5, se_var / var]).reshape(2, -1)

    def relative_errors(self, population: Population, batches: Any) -> Array:
        """Per channel, the relative standard error: the larger of the two
        :meth:`relative_standard_errors`; NaN counts as infinite."""
        return largest(self.relative_standard_errors(population, batches), axis=0)

    def relative_error(self, population: Population, batches: int) -> Array:
        """The worst channel's :meth:`relative_errors`, 0-d (on the device for tensors)."""
        return largest(self.relative_errors(population, batches))


def miss_probability(relative_errors: Array, tolerance: float, drawn: Any = None) -> Array:
    """At most the probability that some estimate lies farther than ``tolerance`` from its
    truth, each estimate normal around it with the standard error ``r`` in
    ``relative_errors`` (any shape; relative, as ``tolerance``). The union bound over the
    estimates (Bonferroni, each estimate with its own standard error)::

        P(some |error| > tolerance)  <=  sum over estimates of  P(|Z| > tolerance / r)

    An estimate with an infinite or NaN ``r`` counts 1; 0-d, on the device for tensors. With
    ``K`` estimates of one standard error ``r`` it is at most 0.05 exactly when
    ``r * Phi^-1(1 - 0.05 / (2 K))`` is at most ``tolerance``: 3.89 standard errors for 500
    estimates; estimates with smaller errors count less.

    The truth is the population the batches are drawn from; with ``drawn`` (the share of a
    data set's batches drawn, without replacement, per estimate or one for all; broadcast
    against ``relative_errors``) it is the whole data set's statistics instead, and each
    ``r`` shrinks by the finite population correction::

        r_data = r * sqrt(1 - drawn)          (0 once every batch is drawn: exact)
    """
    with np.errstate(divide="ignore", invalid="ignore"):  # r = 0 or inf: NumPy's 1/0, inf*0
        if drawn is not None:
            remaining = clamp_min(1 - drawn, 0.0)
            relative_errors = where(
                remaining > 0, relative_errors * remaining**0.5, zeros_like(relative_errors)
            )
        misses = normal_tail(tolerance / relative_errors)
    misses = where(misses == misses, misses, 1.0)  # NaN: unknown, counted as a miss
    return misses.sum()


__all__ = ["BatchSpread", "miss_probability"]
