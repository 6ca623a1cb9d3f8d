"""The engine's Ghost Batch Norm layer (Hoffer et al. 2017): each training batch normalized in
virtual batches, batch norm at test time."""

from __future__ import annotations

from typing import Any

import numpy as np

from bnstats.engine.layers import BatchNorm
from bnstats.ghost import GhostCache, check_ghost_size, ghost_batch_norm_forward


class GhostBatchNorm(BatchNorm):
    """Ghost Batch Norm: a :class:`BatchNorm` that trains on virtual batches of ``ghost_size`` rows.

    Training cuts the batch into consecutive virtual batches ``x[s]`` (see
    :func:`bnstats.ghost.ghost_sizes`: the last may be smaller; a last one of a single row joins
    the one before it) and normalizes each with its own moments (Hoffer, Hubara & Soudry 2017)::

        mu_s, var_s = mean(x[s]), mean((x[s] - mu_s)**2)     biased
        z_tilde[s]  = gamma * (x[s] - mu_s) / sqrt(var_s + eps) + beta

    and every estimator takes ``update(mu_s, var_s, count_s)``: one update per virtual batch, so
    an ``EMA(momentum)`` moves as if the virtual batches had been separate steps. At test time
    this is batch norm. ``last_batch_mean``/``last_batch_var`` hold the last virtual batch's
    statistics (the estimators' latest input), ``last_ghost_mean``/``last_ghost_var`` all of
    them, one row per virtual batch. Other arguments are :class:`BatchNorm`'s; a
    ``ghost_size`` under 2 raises ``ValueError``.
    """

    kind = "GhostBatchNorm"

    def __init__(self, num_features: int, *, ghost_size: int, **options: Any) -> None:
        super().__init__(num_features, **options)
        self.ghost_size = check_ghost_size(ghost_size, self.label)
        self.last_ghost_mean: np.ndarray | None = None
        self.last_ghost_var: np.ndarray | None = None

    def _normalize_batch(self, x: np.ndarray) -> tuple[np.ndarray, GhostCache]:
        """Batch norm of each virtual batch on its own."""
        gamma, beta = self.params["weight"], self.params["bias"]
        out, cache = ghost_batch_norm_forward(x, gamma, beta, self.ghost_size, eps=self.eps)
        seen = cache.batch_moments()
        self.last_ghost_mean = np.stack([mu for mu, _, _ in seen])
        self.last_ghost_var = np.stack([var for _, var, _ in seen])
        return out, cache

    def config(self) -> dict[str, Any]:
        return {**super().config(), "ghost_size": self.ghost_size}
