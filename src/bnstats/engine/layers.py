"""The engine's layers: Linear, ReLU and BatchNorm, each with an explicit forward and backward.

Every layer keeps its learnable arrays in ``params`` and their gradients in ``grads`` (same
keys, PyTorch's names: ``weight``, ``bias``) and is named (``linear1``, ``bn1``...) so that
errors and histories can say which layer they are about.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from bnstats import functional as F
from bnstats.stats import EMA, Estimator

BATCH = "batch"
"""``stats=BATCH`` normalizes with the batch's own statistics, even at test time."""


class Layer:
    """A named layer with ``forward``/``backward`` and its ``params``/``grads``."""

    kind = "Layer"

    def __init__(self, name: str | None = None) -> None:
        self.name = name or ""
        self.params: dict[str, np.ndarray] = {}
        self.grads: dict[str, np.ndarray] = {}

    def forward(self, x: np.ndarray, *, training: bool = False, **_: Any) -> np.ndarray:
        raise NotImplementedError

    def backward(self, dout: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    @property
    def label(self) -> str:
        """How errors name the layer: ``BatchNorm 'bn1'``."""
        return f"{self.kind} '{self.name}'"

    def config(self) -> dict[str, Any]:
        """The constructor arguments, for checkpoints."""
        return {}

    @classmethod
    def param_shapes(cls, config: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
        """The shape of each of ``params`` for a layer built from ``config`` (as
        :meth:`config` gives it), known without building the layer."""
        return {}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return f"{self.kind}({args}) '{self.name}'"


class Linear(Layer):
    """``z = x @ weight.T + bias`` with ``weight`` of shape (out_features, in_features).

    Weights start He-normal, ``N(0, 2 / in_features)`` (He et al. 2015), for ReLU networks.
    A Linear followed by BatchNorm needs no bias: batch norm subtracts the mean, bias and all.
    """

    kind = "Linear"

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        rng: np.random.Generator | None = None,
        name: str | None = None,
    ) -> None:
        super().__init__(name)
        rng = rng if rng is not None else np.random.default_rng()
        self.in_features, self.out_features = int(in_features), int(out_features)
        std = np.sqrt(2.0 / self.in_features)
        self.params["weight"] = rng.normal(0.0, std, (self.out_features, self.in_features))
        if bias:
            self.params["bias"] = np.zeros(self.out_features)
        self._x: np.ndarray | None = None

    def forward(self, x: np.ndarray, *, training: bool = False, **_: Any) -> np.ndarray:
        if x.ndim != 2 or x.shape[1] != self.in_features:
            raise ValueError(
                f"{self.label} expects input of shape (N, {self.in_features}), got {x.shape}"
            )
        self._x = x
        z = x @ self.params["weight"].T
        if "bias" in self.params:
            z = z + self.params["bias"]
        return z

    def backward(self, dout: np.ndarray) -> np.ndarray:
        """``dweight = dout.T @ x``, ``dbias = sum(dout)``, ``dx = dout @ weight``."""
        self.grads["weight"] = dout.T @ self._x
        if "bias" in self.params:
            self.grads["bias"] = dout.sum(axis=0)
        return dout @ self.params["weight"]

    def config(self) -> dict[str, Any]:
        return {
            "in_features": self.in_features,
            "out_features": self.out_features,
            "bias": "bias" in self.params,
        }

    @classmethod
    def param_shapes(cls, config: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
        out, inputs = int(config["out_features"]), int(config["in_features"])
        return {"weight": (out, inputs), **({"bias": (out,)} if config.get("bias", True) else {})}


class ReLU(Layer):
    """``a = max(z, 0)``; the gradient passes where ``z > 0``."""

    kind = "ReLU"

    def forward(self, x: np.ndarray, *, training: bool = False, **_: Any) -> np.ndarray:
        self._mask = x > 0
        return x * self._mask

    def backward(self, dout: np.ndarray) -> np.ndarray:
        return dout * self._mask


class BatchNorm(Layer):
    """Batch normalization with any number of named test-time estimators side by side.

    Training (Ioffe & Szegedy 2015), for this layer's pre-activations ``z``::

        mu, var = mean(z), mean((z - mu)**2)          the batch's own, biased
        z_norm  = (z - mu) / sqrt(var + eps)
        z_tilde = gamma * z_norm + beta               gamma, beta = params["weight"], ["bias"]

    then every estimator takes ``update(mu, var, count)``. At test time ``stats`` picks whose
    ``mu``/``var`` to use: an estimator's name (its ``.mean``/``.var``, the latter unbiased as in
    PyTorch) or ``"batch"`` for the test batch's own statistics. Input is (N, C) or (N, C, ...).
    ``last_moments`` holds the ``(mu, var, count)`` the estimators took at the last training step.
    ``estimators`` default to ``{"ema": EMA(0.1)}``; each layer keeps its own copies.

    Subclasses change only :meth:`_normalize_batch`, the training forward; the check before it
    and the estimator update after it are the same for every variant.
    """

    kind = "BatchNorm"

    def __init__(
        self,
        num_features: int,
        eps: float = F.DEFAULT_EPS,
        estimators: Mapping[str, Estimator] | None = None,
        name: str | None = None,
    ) -> None:
        super().__init__(name)
        self.num_features, self.eps = int(num_features), float(eps)
        self.params["weight"] = np.ones(self.num_features)
        self.params["bias"] = np.zeros(self.num_features)
        templates = estimators if estimators is not None else {"ema": EMA(0.1)}
        if not templates:
            raise ValueError(f"{self.label} needs at least one estimator")
        self.estimators: dict[str, Estimator] = {
            key: copy.deepcopy(est) for key, est in templates.items()
        }
        self.last_batch_mean: np.ndarray | None = None
        self.last_batch_var: np.ndarray | None = None
        self.last_moments: list[F.Moments] = []
        self._cache: F.NormCache | None = None

    @property
    def default_stats(self) -> str:
        """The estimator used when ``stats`` is not given: the first one."""
        return next(iter(self.estimators))

    def forward(
        self,
        x: np.ndarray,
        *,
        training: bool = False,
        stats: str | None = None,
        update: Iterable[Estimator] | None = None,
        **_: Any,
    ) -> np.ndarray:
        """Normalize ``x``. In training, feed the batch's moments to ``update`` (default: every
        estimator of the layer), all of them or, if one raises, none; at test time normalize
        with ``stats``. Raises ``ValueError`` for input of the wrong shape or, in training, of
        one value per channel, and :class:`~bnstats.stats.NonFiniteStatisticsError` for NaN/Inf
        statistics that an estimator refuses."""
        self._check_input(x, training)
        if not training:
            mu, var = (None, None) if stats == BATCH else self.statistics(stats)
            gamma, beta = self.params["weight"], self.params["bias"]
            out, self._cache = F.batch_norm_forward(x, gamma, beta, mu=mu, var=var, eps=self.eps)
            return out
        out, self._cache = self._normalize_batch(x)
        seen = self.last_moments = self._cache.batch_moments()
        self.last_batch_mean, self.last_batch_var = seen[-1][0], seen[-1][1]
        targets = list(self.estimators.values()) if update is None else list(update)
        self._update_all_or_none(targets, seen)
        return out

    def _normalize_batch(self, x: np.ndarray) -> tuple[np.ndarray, F.NormCache]:
        """The training output and its cache: batch norm with the batch's own moments."""
        return F.batch_norm_forward(x, self.params["weight"], self.params["bias"], eps=self.eps)

    def _update_all_or_none(self, targets: list[Estimator], seen: list[F.Moments]) -> None:
        """Feed each ``(mu, var, count)`` of ``seen``, in order, to every target; if an update
        raises, every target gets its state back and the error names this layer. (A lone
        update needs no saved state: an estimator checks a batch before it changes.)"""
        lone = len(targets) * len(seen) == 1
        saved = [] if lone else [est.state_dict() for est in targets]
        try:
            for mu, var, count in seen:
                for est in targets:
                    est.update(mu, var, count)
        except ValueError as err:
            for est, state in zip(targets, saved, strict=not lone):
                est.load_state_dict(state)
            raise type(err)(f"{self.label}: {err} No estimator of the layer was updated.") from err

    def statistics(self, stats: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The test-time ``(mu, var)`` of estimator ``stats`` (default: the first)."""
        key = self.default_stats if stats is None else stats
        if key not in self.estimators:
            raise ValueError(
                f"{self.label} has no estimator {key!r}; "
                f"it has {sorted(self.estimators)} (or use stats='batch')"
            )
        est = self.estimators[key]
        if est.mean is None:
            raise ValueError(
                f"{self.label}: estimator {key!r} has seen no batch yet; "
                "train or recalibrate the network first"
            )
        return est.mean, est.var

    def _check_input(self, x: np.ndarray, training: bool) -> None:
        if x.ndim < 2 or x.shape[1] != self.num_features:
            expected = f"(N, {self.num_features}) or (N, {self.num_features}, ...)"
            raise ValueError(f"{self.label} expects input {expected}, got {x.shape}")
        if training and F.count_per_channel(x.shape) < 2:
            raise ValueError(
                f"{self.label} got input of shape {x.shape} in training: batch statistics "
                "need more than one value per channel (drop or merge the batch)"
            )

    def backward(self, dout: np.ndarray) -> np.ndarray:
        """The backward of the last forward, whichever it was (its cache knows)."""
        dx, self.grads["weight"], self.grads["bias"] = self._cache.backward(dout)
        return dx

    def config(self) -> dict[str, Any]:
        return {"num_features": self.num_features, "eps": self.eps}

    @classmethod
    def param_shapes(cls, config: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
        features = int(config["num_features"])
        return {"weight": (features,), "bias": (features,)}
