"""Batch Renormalization (Ioffe 2017): its schedule, the correction ``r, d``, forward, backward::

    sigma_B = sqrt(var_B + eps)                  var_B biased, as batch norm trains with
    sigma   = sqrt(running_var + eps)            running_var unbiased, as inference uses it
    r = clip(sigma_B / sigma, 1 / rmax, rmax)    no gradient flows through r
    d = clip((mu_B - mu) / sigma, -dmax, dmax)   nor through d
    z_hat   = (z - mu_B) / sigma_B * r + d
    z_tilde = gamma * z_hat + beta

Unclipped, ``z_hat = (z - mu) / sigma``: training computes what inference computes. The running
statistics take ``mu_B`` and ``var_B`` as in batch norm, after ``r, d`` are taken from them. With
``rmax = 1``, ``dmax = 0`` (or no running statistics yet) ``r = 1``, ``d = 0``: batch norm.
:func:`renorm_correction` serves NumPy arrays and torch tensors; forward/backward are NumPy.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np

from bnstats import functional as F
from bnstats._array import Array


@dataclass(frozen=True)
class RenormSchedule:
    """How far ``r`` and ``d`` may move from 1 and 0, as a function of the training step.

    Until ``warmup_steps`` the limits are ``rmax = 1``, ``dmax = 0`` (batch norm); then each
    grows linearly to its end value, ``rmax`` reached at step ``rmax_full_at`` and ``dmax`` at
    ``dmax_full_at``, and stays there::

        ramp(step, full_at) = clip((step - warmup_steps) / (full_at - warmup_steps), 0, 1)
        rmax(step) = 1 + (rmax - 1) * ramp(step, rmax_full_at)
        dmax(step) = dmax * ramp(step, dmax_full_at)

    ``step`` is the number of batches the running statistics have already taken. The defaults
    are Ioffe (2017)'s Inception-v3 schedule (the ramps' linear shape is bnstats' choice). A
    limit out of range (``rmax < 1``, ``dmax < 0``, a negative or fractional step) raises
    ``ValueError``.
    """

    rmax: float = 3.0
    dmax: float = 5.0
    warmup_steps: int = 5000
    rmax_full_at: int = 40000
    dmax_full_at: int = 25000

    def __post_init__(self) -> None:
        if not float(self.rmax) >= 1.0:
            raise ValueError(f"RenormSchedule: rmax must be at least 1, got {self.rmax}")
        if not float(self.dmax) >= 0.0:
            raise ValueError(f"RenormSchedule: dmax must be at least 0, got {self.dmax}")
        for key in ("warmup_steps", "rmax_full_at", "dmax_full_at"):
            value = getattr(self, key)
            if int(value) != value or value < 0:
                raise ValueError(f"RenormSchedule: {key} must be a whole number >= 0, got {value}")
            object.__setattr__(self, key, int(value))
        object.__setattr__(self, "rmax", float(self.rmax))
        object.__setattr__(self, "dmax", float(self.dmax))

    @classmethod
    def constant(cls, rmax: float, dmax: float) -> RenormSchedule:
        """The same limits from the first step on, no warm-up."""
        return cls(rmax=rmax, dmax=dmax, warmup_steps=0, rmax_full_at=0, dmax_full_at=0)

    def limits(self, step: int) -> tuple[float, float]:
        """``(rmax, dmax)`` at ``step``."""
        rmax = 1.0 + (self.rmax - 1.0) * self._progress(step, self.rmax_full_at)
        dmax = self.dmax * self._progress(step, self.dmax_full_at)
        return rmax, dmax

    def _progress(self, step: int, full_at: int) -> float:
        """0 before the warm-up ends, 1 from ``full_at`` on, linear in between."""
        if step < self.warmup_steps:
            return 0.0
        if step >= full_at:
            return 1.0
        return (step - self.warmup_steps) / (full_at - self.warmup_steps)

    def scaled(self, factor: float) -> RenormSchedule:
        """Every step count multiplied by ``factor`` (rounded), the end values kept."""
        if not factor > 0:
            raise ValueError(f"RenormSchedule.scaled: factor must be positive, got {factor}")
        return replace(
            self,
            warmup_steps=round(self.warmup_steps * factor),
            rmax_full_at=round(self.rmax_full_at * factor),
            dmax_full_at=round(self.dmax_full_at * factor),
        )

    def scaled_to(self, total_steps: int, ramp_end: float = 0.5) -> RenormSchedule:
        """This schedule's proportions fitted into a run of ``total_steps``: the later of the two
        ramps ends at ``ramp_end * total_steps`` (by default half-way, so the second half of the
        run trains with the full correction). The paper's 5k : 25k : 40k becomes, for 400 steps,
        25 : 125 : 200. The warm-up shrinks too: keep it at a few times ``1 / momentum`` steps,
        so that the running statistics ``r, d`` correct toward have converged."""
        if int(total_steps) < 1:
            raise ValueError(f"RenormSchedule: total_steps must be >= 1, got {total_steps}")
        if not 0.0 < ramp_end <= 1.0:
            raise ValueError(f"RenormSchedule: ramp_end must lie in (0, 1], got {ramp_end}")
        last = max(self.rmax_full_at, self.dmax_full_at, self.warmup_steps)
        if last == 0:
            return self
        return self.scaled(ramp_end * int(total_steps) / last)

    def to_dict(self) -> dict[str, Any]:
        """Plain values, for checkpoints and JSON."""
        return asdict(self)


def as_schedule(schedule: RenormSchedule | Mapping[str, Any] | None) -> RenormSchedule:
    """A :class:`RenormSchedule` from itself, its :meth:`~RenormSchedule.to_dict`, or None (the
    paper's)."""
    if schedule is None:
        return RenormSchedule()
    if isinstance(schedule, RenormSchedule):
        return schedule
    if isinstance(schedule, Mapping):
        return RenormSchedule(**schedule)
    raise TypeError(f"expected a RenormSchedule or a dict of its fields, got {type(schedule)}")


def renorm_correction(
    mu: Array,
    var: Array,
    running_mean: Array,
    running_var: Array,
    eps: float,
    rmax: float,
    dmax: float,
) -> tuple[Array, Array]:
    """Per-channel ``(r, d)`` of Ioffe (2017), Algorithm 1::

        sigma_B = sqrt(var + eps);  sigma = sqrt(running_var + eps)
        r = clip(sigma_B / sigma, 1 / rmax, rmax)
        d = clip((mu - running_mean) / sigma, -dmax, dmax)

    ``mu`` and BIASED ``var`` are the batch's, ``running_mean`` and UNBIASED ``running_var`` the
    test-time estimate. Callers treat the result as a constant (stop-gradient).
    """
    sigma = (running_var + eps) ** 0.5
    r = ((var + eps) ** 0.5 / sigma).clip(1.0 / rmax, rmax)
    d = ((mu - running_mean) / sigma).clip(-dmax, dmax)
    return r, d


@dataclass
class RenormCache:
    """What :func:`batch_renorm_backward` needs: batch norm's cache and the constants ``r, d``."""

    bn: F.BatchNormCache
    r: np.ndarray
    d: np.ndarray

    def backward(self, dz_tilde: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """:func:`batch_renorm_backward` of this cache."""
        return batch_renorm_backward(dz_tilde, self)

    def batch_moments(self) -> list[F.Moments]:
        """``[(mu_B, var_B, count)]``: the batch's own moments."""
        return self.bn.batch_moments()


def batch_renorm_forward(
    z: np.ndarray,
    gamma: np.ndarray,
    beta: np.ndarray,
    r: np.ndarray,
    d: np.ndarray,
    eps: float = F.DEFAULT_EPS,
    *,
    moments: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[np.ndarray, RenormCache]:
    """``z_tilde = gamma * (z_norm * r + d) + beta`` with ``z_norm = (z - mu_B) / sigma_B`` from the
    batch's own (biased) moments and per-channel constants ``r``, ``d`` (see
    :func:`renorm_correction`). ``moments`` are ``(mu_B, var_B)`` when already computed (to
    compute ``r, d``). Returns ``z_tilde`` and the cache."""
    gamma64 = np.asarray(gamma, dtype=np.float64)
    mu, var = F.moments(z) if moments is None else moments
    _, bn_cache = F.normalize(z, gamma64, gamma64 * 0, mu, var, eps=eps, batch_stats=True)
    ndim = np.ndim(z)
    r64, d64 = np.asarray(r, np.float64), np.asarray(d, np.float64)
    z_hat = bn_cache.z_norm * F.channel_view(r64, ndim) + F.channel_view(d64, ndim)
    beta64 = np.asarray(beta, dtype=np.float64)
    z_tilde = F.channel_view(gamma64, ndim) * z_hat + F.channel_view(beta64, ndim)
    cache = RenormCache(bn=bn_cache, r=r64, d=d64)
    return z_tilde.astype(np.result_type(z, np.float32), copy=False), cache


def batch_renorm_backward(
    dz_tilde: np.ndarray, cache: RenormCache
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gradients ``(dz, dgamma, dbeta)`` with ``r`` and ``d`` held constant (Ioffe 2017).

    ``z_tilde = gamma * (r * z_norm + d) + beta``, so with ``g = gamma * dz_tilde``::

        dbeta  = sum(dz_tilde)
        dgamma = sum(dz_tilde * (r * z_norm + d)) = r * sum(dz_tilde * z_norm) + d * dbeta
        dz     = r * inv_std / count * (count * g - sum(g) - z_norm * sum(g * z_norm))

    that is batch norm's ``dz`` scaled by ``r`` (sums over the reduction axes, per channel).
    """
    dz_bn, dgamma_bn, dbeta = F.batch_norm_backward(dz_tilde, cache.bn)
    dz = dz_bn * F.channel_view(cache.r, np.ndim(dz_bn))
    dgamma = cache.r * dgamma_bn + cache.d * dbeta
    return dz, dgamma, dbeta


__all__ = [
    "RenormCache",
    "RenormSchedule",
    "as_schedule",
    "batch_renorm_backward",
    "batch_renorm_forward",
    "renorm_correction",
]
