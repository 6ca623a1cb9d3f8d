"""The engine's Batch Renormalization layer (Ioffe 2017): batch norm corrected toward the
running statistics during training, batch norm at test time."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from bnstats import functional as F
from bnstats.engine.layers import BatchNorm, register_layer
from bnstats.renorm import (
    RenormCache,
    RenormSchedule,
    as_schedule,
    batch_renorm_backward,
    batch_renorm_forward,
    renorm_correction,
)
from bnstats.stats import Estimator


@register_layer
class BatchRenorm(BatchNorm):
    """Batch Renormalization: a :class:`BatchNorm` whose training output is corrected by ``r, d``.

    Training, for this layer's pre-activations ``z`` (Ioffe 2017, Algorithm 1)::

        mu_B, var_B = mean(z), mean((z - mu_B)**2)              the batch's own, biased
        mu, var     = estimators[reference].mean, .var          before this batch; var unbiased
        rmax, dmax  = schedule.limits(step)                     step = batches the reference took
        r = clip(sqrt(var_B + eps) / sqrt(var + eps), 1 / rmax, rmax)
        d = clip((mu_B - mu) / sqrt(var + eps), -dmax, dmax)
        z_norm  = (z - mu_B) / sqrt(var_B + eps)
        z_tilde = gamma * (z_norm * r + d) + beta

    then every estimator takes ``update(mu_B, var_B, count)`` as in batch norm. ``r`` and ``d``
    are constants for the backward pass (no gradient flows through them); with
    ``g = gamma * dz_tilde`` and sums over the batch (and spatial) axes::

        dbeta  = sum(dz_tilde)
        dgamma = r * sum(dz_tilde * z_norm) + d * dbeta
        dz     = r * inv_std / count * (count * g - sum(g) - z_norm * sum(g * z_norm))

    ``reference`` names the estimator ``r, d`` correct toward (default: the first, the one test
    time uses by default), so that unclipped training computes exactly what inference computes.
    Before it has taken a batch, ``r = 1`` and ``d = 0``. At test time this is batch norm, with
    ``stats`` choosing the estimate as usual. The last ``r, d`` are kept in ``last_r``,
    ``last_d``.
    """

    kind = "BatchRenorm"

    def __init__(
        self,
        num_features: int,
        eps: float = F.DEFAULT_EPS,
        estimators: Mapping[str, Estimator] | None = None,
        name: str | None = None,
        schedule: RenormSchedule | Mapping[str, Any] | None = None,
        reference: str | None = None,
    ) -> None:
        super().__init__(num_features, eps=eps, estimators=estimators, name=name)
        self.schedule = as_schedule(schedule)
        self.reference = self.default_stats if reference is None else str(reference)
        if estimators is not None:
            self._reference_estimator()
        self.last_r: np.ndarray | None = None
        self.last_d: np.ndarray | None = None

    def _reference_estimator(self) -> Estimator:
        if self.reference not in self.estimators:
            raise ValueError(
                f"BatchRenorm '{self.name}': reference {self.reference!r} is not one of its "
                f"estimators {sorted(self.estimators)}"
            )
        return self.estimators[self.reference]

    @property
    def step(self) -> int:
        """Batches the reference estimator has taken: the schedule's clock."""
        return self._reference_estimator().num_batches_tracked

    def correction(self, mu: np.ndarray, var: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(r, d)`` for a batch with moments ``mu``, biased ``var``, at the current step."""
        reference = self._reference_estimator()
        if reference.mean is None:
            return np.ones_like(mu), np.zeros_like(mu)
        rmax, dmax = self.schedule.limits(self.step)
        return renorm_correction(mu, var, reference.mean, reference.var, self.eps, rmax, dmax)

    def _forward_training(self, x: np.ndarray, update: Iterable[Estimator] | None) -> np.ndarray:
        count = F.count_per_channel(x.shape)
        if count < 2:
            raise ValueError(
                f"BatchRenorm '{self.name}' got input of shape {x.shape} in training: batch "
                "statistics need more than one value per channel (drop or merge the batch)"
            )
        mu, var = F.moments(x)
        r, d = self.correction(mu, var)
        out, self._cache = batch_renorm_forward(
            x, self.params["weight"], self.params["bias"], r, d, eps=self.eps
        )
        self.last_batch_mean, self.last_batch_var = self._cache.bn.mu, self._cache.bn.var
        self.last_r, self.last_d = r, d
        targets = list(self.estimators.values()) if update is None else list(update)
        self._update_estimators(targets, self._cache.bn.mu, self._cache.bn.var, count)
        return out

    def backward(self, dout: np.ndarray) -> np.ndarray:
        """Batch Renorm's backward after a training forward (``r, d`` constant), batch norm's
        after a test-time one."""
        if not isinstance(self._cache, RenormCache):
            return super().backward(dout)
        dx, self.grads["weight"], self.grads["bias"] = batch_renorm_backward(dout, self._cache)
        return dx

    def config(self) -> dict[str, Any]:
        schedule = self.schedule.to_dict()
        return {**super().config(), "schedule": schedule, "reference": self.reference}
