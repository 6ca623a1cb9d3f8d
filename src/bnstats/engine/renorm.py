"""The engine's Batch Renormalization layer (Ioffe 2017): batch norm corrected toward the
running statistics during training, batch norm at test time."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from bnstats import functional as F
from bnstats.engine.layers import BatchNorm
from bnstats.renorm import (
    RenormCache,
    RenormSchedule,
    as_schedule,
    batch_renorm_forward,
    renorm_correction,
)
from bnstats.stats import Estimator


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
    are constants for the backward pass (:func:`bnstats.renorm.batch_renorm_backward`).

    ``schedule`` (a :class:`~bnstats.renorm.RenormSchedule` or its dict; default the paper's)
    sets ``rmax, dmax``; ``reference`` names the estimator ``r, d`` correct toward (default: the
    first). Before it has taken a batch, ``r = 1`` and ``d = 0``; at test time this is batch
    norm. Other arguments are :class:`BatchNorm`'s; an unknown ``reference`` raises
    ``ValueError``.
    """

    kind = "BatchRenorm"

    def __init__(
        self,
        num_features: int,
        *,
        schedule: RenormSchedule | Mapping[str, Any] | None = None,
        reference: str | None = None,
        **options: Any,
    ) -> None:
        super().__init__(num_features, **options)
        self.schedule = as_schedule(schedule)
        self.reference = self.default_stats if reference is None else str(reference)
        if options.get("estimators") is not None:  # a checkpoint sets them after building
            self._reference_estimator()
        self.last_r: np.ndarray | None = None
        self.last_d: np.ndarray | None = None

    def _reference_estimator(self) -> Estimator:
        if self.reference not in self.estimators:
            raise ValueError(
                f"{self.label}: reference {self.reference!r} is not one of its "
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

    def _normalize_batch(self, x: np.ndarray) -> tuple[np.ndarray, RenormCache]:
        """Batch Renorm's training output: the batch's moments, taken once, give ``r, d``."""
        mu, var = F.moments(x)
        self.last_r, self.last_d = self.correction(mu, var)
        gamma, beta = self.params["weight"], self.params["bias"]
        return batch_renorm_forward(
            x, gamma, beta, self.last_r, self.last_d, eps=self.eps, moments=(mu, var)
        )

    def config(self) -> dict[str, Any]:
        schedule = self.schedule.to_dict()
        return {**super().config(), "schedule": schedule, "reference": self.reference}
