"""The engine's Ghost Batch Norm layer (Hoffer et al. 2017): each training batch normalized in
virtual batches, batch norm at test time."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from bnstats import functional as F
from bnstats._array import all_finite
from bnstats.engine.layers import BatchNorm, register_layer
from bnstats.ghost import check_ghost_size, ghost_slices
from bnstats.stats import Estimator, NonFiniteStatisticsError


@register_layer
class GhostBatchNorm(BatchNorm):
    """Ghost Batch Norm: a :class:`BatchNorm` that trains on virtual batches of ``ghost_size`` rows.

    Training cuts the batch into consecutive virtual batches ``x[s]`` (see
    :func:`bnstats.ghost.ghost_sizes`: the last may be smaller; a last one of a single row joins
    the one before it) and for each, in order (Hoffer, Hubara & Soudry 2017)::

        mu_s, var_s = mean(x[s]), mean((x[s] - mu_s)**2)     biased
        z_tilde[s]  = gamma * (x[s] - mu_s) / sqrt(var_s + eps) + beta

    and every estimator takes ``update(mu_s, var_s, count_s)``: one update per virtual batch, so
    an ``EMA(momentum)`` moves as if the virtual batches had been separate steps. The backward
    pass is batch norm's, per virtual batch; ``dgamma`` and ``dbeta`` sum over them. A batch
    with NaN/Inf in any virtual batch updates no estimator (unless they all skip such batches).
    At test time this is batch norm. ``last_batch_mean``/``last_batch_var`` hold the last
    virtual batch's statistics (the estimators' latest input), ``last_ghost_mean``/
    ``last_ghost_var`` all of them, one row per virtual batch.
    """

    kind = "GhostBatchNorm"

    def __init__(
        self,
        num_features: int,
        eps: float = F.DEFAULT_EPS,
        estimators: Mapping[str, Estimator] | None = None,
        name: str | None = None,
        *,
        ghost_size: int,
    ) -> None:
        super().__init__(num_features, eps=eps, estimators=estimators, name=name)
        self.ghost_size = check_ghost_size(ghost_size, f"GhostBatchNorm '{self.name}'")
        self.last_ghost_mean: np.ndarray | None = None
        self.last_ghost_var: np.ndarray | None = None
        self._ghosts: list[tuple[slice, F.BatchNormCache]] = []

    def _forward_training(self, x: np.ndarray, update: Iterable[Estimator] | None) -> np.ndarray:
        slices = ghost_slices(len(x), self.ghost_size)
        if F.count_per_channel(x[slices[0]].shape) < 2:
            raise ValueError(
                f"GhostBatchNorm '{self.name}' got input of shape {x.shape} in training: batch "
                "statistics need more than one value per channel (drop or merge the batch)"
            )
        parts, self._ghosts = [], []
        for part in slices:
            out, cache = F.batch_norm_forward(
                x[part], self.params["weight"], self.params["bias"], eps=self.eps
            )
            parts.append(out)
            self._ghosts.append((part, cache))
        self._cache = None  # marks the last forward as a training one, for backward
        self.last_ghost_mean = np.stack([c.mu for _, c in self._ghosts])
        self.last_ghost_var = np.stack([c.var for _, c in self._ghosts])
        self.last_batch_mean, self.last_batch_var = self._ghosts[-1][1].mu, self._ghosts[-1][1].var
        targets = list(self.estimators.values()) if update is None else list(update)
        self._update_estimators_per_ghost(targets)
        return np.concatenate(parts)

    def _update_estimators_per_ghost(self, targets: list[Estimator]) -> None:
        """One update per virtual batch, in order; a non-finite one raises before any moves."""
        finite = all_finite(self.last_ghost_mean) and all_finite(self.last_ghost_var)
        if not finite and any(est.nonfinite == "raise" for est in targets):
            raise NonFiniteStatisticsError(
                f"GhostBatchNorm '{self.name}': a virtual batch's statistics contain NaN or Inf; "
                "no estimator was updated (use nonfinite='skip' estimators to ignore such batches)"
            )
        for _, cache in self._ghosts:
            for est in targets:
                est.update(cache.mu, cache.var, cache.count)

    def backward(self, dout: np.ndarray) -> np.ndarray:
        """Batch norm's backward per virtual batch after a training forward; plain batch norm's
        after a test-time one."""
        if self._cache is not None:
            return super().backward(dout)
        dx = np.empty(np.shape(dout), dtype=np.float64)
        dgamma = np.zeros(self.num_features)
        dbeta = np.zeros(self.num_features)
        for part, cache in self._ghosts:
            dx[part], dgamma_s, dbeta_s = F.batch_norm_backward(dout[part], cache)
            dgamma += dgamma_s
            dbeta += dbeta_s
        self.grads["weight"], self.grads["bias"] = dgamma, dbeta
        return dx

    def config(self) -> dict[str, Any]:
        return {**super().config(), "ghost_size": self.ghost_size}
