"""Estimators of batch norm's test-time statistics.

During training, batch norm normalizes a layer's pre-activations ``z`` with the mini-batch's
own ``mu`` and ``var``. At test time a fixed estimate is needed. Each estimator here takes the
per-batch statistics, one batch at a time, and keeps such an estimate:

- :class:`EMA`: the exponentially weighted (running) average of the lecture and of PyTorch,
  optionally bias-corrected;
- :class:`CumulativeAverage`: every batch weighted equally (PyTorch's ``momentum=None``);
- :class:`Population`: the exact mean and variance of every sample seen, mergeable.

Conventions shared by all of them:

- ``update(mean, var, count)`` takes the per-channel batch mean, the *biased* batch variance
  ``var = sum((z - mean)**2) / count`` (the one training normalizes with) and ``count``, the
  number of values per channel in the batch (N for (N, D) input, N*H*W for (N, C, H, W)).
- ``.mean`` and ``.var`` are the current estimates; ``.var`` is *unbiased*, as PyTorch
  stores it: each batch's variance enters as ``var * count / (count - 1)`` (Bessel's
  correction), or for :class:`Population` the pooled ``M2 / (count - 1)``.
- ``momentum`` is the weight of the NEWEST batch, as in PyTorch:
  ``new = (1 - momentum) * old + momentum * batch``. The lecture's beta and the ``momentum``
  of Keras and Flax are ``1 - momentum``; see :func:`momentum_from_decay`.
- Statistics accumulate in float64 (float32 for torch tensors on devices without float64).
- The classes use plain arithmetic only, so they work on NumPy arrays and torch tensors alike.
"""

from __future__ import annotations

from typing import Any, Literal

from bnstats._array import Array, all_finite, copy, widen

NonFinitePolicy = Literal["raise", "skip"]


class NonFiniteStatisticsError(ValueError):
    """A batch brought NaN or Inf statistics; the estimate was left as it was."""


def momentum_from_decay(decay: float) -> float:
    """PyTorch ``momentum`` from a decay factor (the lecture's beta, Keras/Flax ``momentum``).

    The lecture writes ``v = beta * v + (1 - beta) * theta``: beta weighs the OLD value.
    PyTorch's momentum weighs the NEW batch, so ``momentum = 1 - beta``; Keras' default 0.99
    is PyTorch's 0.01.
    """
    _check_fraction(decay, "decay")
    return 1.0 - decay


def decay_from_momentum(momentum: float) -> float:
    """The decay factor (lecture's beta, Keras/Flax ``momentum``) for a PyTorch ``momentum``."""
    _check_fraction(momentum, "momentum")
    return 1.0 - momentum


def _check_fraction(value: float, name: str) -> None:
    if not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{name} must lie in [0, 1], got {value!r}")


class Estimator:
    """Shared bookkeeping: input checks, counts, the non-finite policy, state dicts.

    Subclasses implement ``_update(mean, var, count)`` on already-validated, widened arrays
    and the ``mean`` / ``var`` properties.
    """

    _state_keys: tuple[str, ...] = ()
    _config_keys: tuple[str, ...] = ("nonfinite",)

    def __init__(self, nonfinite: NonFinitePolicy = "raise") -> None:
        if nonfinite not in ("raise", "skip"):
            raise ValueError(f"nonfinite must be 'raise' or 'skip', got {nonfinite!r}")
        self.nonfinite: NonFinitePolicy = nonfinite
        self.reset()

    def reset(self) -> None:
        """Forget every batch seen."""
        self.count: float = 0
        self.num_batches_tracked: int = 0
        self.num_batches_skipped: int = 0
        self._shape: tuple[int, ...] | None = None

    def update(self, mean: Array, var: Array, count: float) -> None:
        """Take one batch's per-channel ``mean``, biased ``var`` and ``count`` values per channel.

        Raises :class:`NonFiniteStatisticsError` for NaN/Inf (or, with ``nonfinite="skip"``,
        ignores the batch and counts it in ``num_batches_skipped``) and ``ValueError`` for
        mismatched shapes, a negative variance or a non-positive count.
        """
        self._check_batch(mean, var, count)
        if not (all_finite(mean) and all_finite(var)):
            if self.nonfinite == "skip":
                self.num_batches_skipped += 1
                return
            raise NonFiniteStatisticsError(
                f"{type(self).__name__}: the batch statistics contain NaN or Inf "
                f"(count={count}); the estimate was left unchanged. "
                "Pass nonfinite='skip' to ignore such batches."
            )
        self._update(widen(mean), widen(var), count)
        self._shape = tuple(mean.shape)
        self.count += count
        self.num_batches_tracked += 1

    def _check_batch(self, mean: Array, var: Array, count: float) -> None:
        if tuple(mean.shape) != tuple(var.shape):
            raise ValueError(
                f"{type(self).__name__}.update: mean has shape {tuple(mean.shape)} "
                f"but var has shape {tuple(var.shape)}"
            )
        if self._shape is not None and tuple(mean.shape) != self._shape:
            raise ValueError(
                f"{type(self).__name__}.update: expected statistics of shape {self._shape}, "
                f"got {tuple(mean.shape)}"
            )
        if not count > 0:
            raise ValueError(f"{type(self).__name__}.update: count must be positive, got {count}")
        if bool((var < 0).any()):
            raise ValueError(f"{type(self).__name__}.update: a batch variance is negative")

    def _update(self, mean: Array, var: Array, count: float) -> None:
        raise NotImplementedError

    @property
    def mean(self) -> Array | None:
        """The test-time estimate of ``mu`` (None before the first batch)."""
        raise NotImplementedError

    @property
    def var(self) -> Array | None:
        """The test-time estimate of ``var``, unbiased (None before the first batch)."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to rebuild this estimator: its kind, settings and state."""
        state: dict[str, Any] = {"kind": type(self).__name__}
        for key in self._config_keys:
            state[key] = getattr(self, key)
        state["count"] = self.count
        state["num_batches_tracked"] = self.num_batches_tracked
        state["num_batches_skipped"] = self.num_batches_skipped
        for key in self._state_keys:
            value = getattr(self, "_" + key)
            state[key] = None if value is None else copy(value)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state from :meth:`state_dict`; the kind must match."""
        kind = state.get("kind")
        if kind != type(self).__name__:
            raise ValueError(f"cannot load a {kind!r} state into a {type(self).__name__}")
        missing = [k for k in (*self._config_keys, *self._state_keys, "count") if k not in state]
        if missing:
            raise ValueError(f"{type(self).__name__} state is missing {missing}")
        for key in self._config_keys:
            setattr(self, key, state[key])
        self.count = state["count"]
        self.num_batches_tracked = int(state.get("num_batches_tracked", 0))
        self.num_batches_skipped = int(state.get("num_batches_skipped", 0))
        self._shape = None
        for key in self._state_keys:
            value = state[key]
            value = None if value is None else copy(widen(value))
            setattr(self, "_" + key, value)
            if value is not None:
                self._shape = tuple(value.shape)

    def __repr__(self) -> str:
        config = ", ".join(f"{k}={getattr(self, k)!r}" for k in self._config_keys)
        return f"{type(self).__name__}({config}, batches={self.num_batches_tracked})"


def _unbiased(var: Array, count: float) -> Array:
    """Bessel's correction of a biased batch variance: ``var * count / (count - 1)``."""
    if count < 2:
        raise ValueError(
            f"an unbiased variance needs at least 2 values per channel, got count={count} "
            "(a training batch of one row cannot be normalized)"
        )
    return var * (count / (count - 1))


class RunningAverage(Estimator):
    """A running average of the per-batch ``mu`` and unbiased ``var``, batch ``t`` weighted by
    ``w_t``::

        running_mean = (1 - w_t) * running_mean + w_t * mean
        running_var  = (1 - w_t) * running_var  + w_t * var * count / (count - 1)

    Subclasses choose ``w_t`` (:meth:`weight`) and whether the average starts from PyTorch's
    ``running_mean = 0``, ``running_var = 1`` (:attr:`starts_at_zero_one`) or from the first
    batch (``w_1 = 1``).
    """

    _state_keys = ("running_mean", "running_var")
    starts_at_zero_one = False

    def reset(self) -> None:
        super().reset()
        self._running_mean: Array | None = None
        self._running_var: Array | None = None

    def weight(self, t: int) -> float:
        """Weight ``w_t`` of batch number ``t`` (1-based)."""
        raise NotImplementedError

    def _update(self, mean: Array, var: Array, count: float) -> None:
        batch_var = _unbiased(var, count)
        if self._running_mean is None:
            self._running_mean = mean * 0
            self._running_var = var * 0 + (1 if self.starts_at_zero_one else 0)
        w = self.weight(self.num_batches_tracked + 1)
        self._running_mean = (1 - w) * self._running_mean + w * mean
        self._running_var = (1 - w) * self._running_var + w * batch_var

    @property
    def mean(self) -> Array | None:
        return self._running_mean

    @property
    def var(self) -> Array | None:
        return self._running_var


class EMA(RunningAverage):
    """Exponentially weighted (running) average of the per-batch ``mu`` and ``var``.

    PyTorch's convention, ``momentum`` weighting the newest batch (``w_t = momentum``)::

        running_mean = (1 - momentum) * running_mean + momentum * mean
        running_var  = (1 - momentum) * running_var  + momentum * var * count / (count - 1)

    starting from ``running_mean = 0`` and ``running_var = 1``. After ``t`` updates the start
    still carries weight ``(1 - momentum)**t`` (35 % at momentum 0.1 and t = 10).

    With ``debias=True`` the average is bias-corrected (Kingma & Ba 2015; Haiku's
    ``zero_debias``): it equals ``v_t / (1 - (1 - momentum)**t)`` where ``v_t`` is the EMA
    started from 0. It is kept directly with ``w_t = momentum / (1 - (1 - momentum)**t)``,
    so ``w_1 = 1`` and the estimate after one update is exactly that batch's statistics.
    """

    _config_keys = ("momentum", "debias", "nonfinite")

    def __init__(
        self, momentum: float = 0.1, debias: bool = False, nonfinite: NonFinitePolicy = "raise"
    ) -> None:
        if momentum is None or not 0.0 < float(momentum) <= 1.0:
            raise ValueError(
                f"EMA momentum must lie in (0, 1] (weight of the newest batch), got {momentum!r}; "
                "use CumulativeAverage() for PyTorch's momentum=None"
            )
        self.momentum = float(momentum)
        self.debias = bool(debias)
        super().__init__(nonfinite)

    @classmethod
    def from_decay(cls, decay: float, debias: bool = False) -> EMA:
        """An EMA from the lecture's beta (Keras/Flax ``momentum``): ``momentum = 1 - decay``."""
        return cls(momentum_from_decay(decay), debias=debias)

    @property
    def starts_at_zero_one(self) -> bool:  # type: ignore[override]
        return not self.debias

    def weight(self, t: int) -> float:
        if not self.debias:
            return self.momentum
        if t == 1:
            return 1.0  # exactly: momentum / (1 - (1 - momentum)) may round away from 1
        return self.momentum / (1.0 - (1.0 - self.momentum) ** t)


class CumulativeAverage(RunningAverage):
    """Every batch weighted equally: the mean of the batch means and of the unbiased variances.

    PyTorch's ``momentum=None`` (``w_t = 1 / t``): after ``t`` batches
    ``running_mean = sum(mean_k) / t`` and
    ``running_var = sum(var_k * count_k / (count_k - 1)) / t``,
    the test-time statistics of Ioffe & Szegedy (2015).
    """

    def weight(self, t: int) -> float:
        return 1.0 / t


class Population(Estimator):
    """The exact mean and unbiased variance of every value seen, each sample weighted equally.

    Keeps ``(count, mean, m2)`` with ``m2 = sum((z - mean)**2)`` and merges each batch (or
    another Population) with the parallel formula of Chan, Golub & LeVeque (1979)::

        delta = mean_b - mean_a
        count = count_a + count_b
        mean  = mean_a + delta * count_b / count
        m2    = m2_a + m2_b + delta**2 * count_a * count_b / count

    A batch enters as ``(count, mean, var * count)``. ``var = m2 / (count - 1)``. Never
    ``E[z**2] - E[z]**2``, which cancels catastrophically when the mean dwarfs the spread.
    """

    _state_keys = ("mean_acc", "m2")

    def reset(self) -> None:
        super().reset()
        self._mean_acc: Array | None = None
        self._m2: Array | None = None

    @classmethod
    def from_moments(cls, count: float, mean: Array, m2: Array) -> Population:
        """A Population holding ``count`` values with this ``mean`` and ``m2`` (sum of squares)."""
        pop = cls()
        if count > 0:
            pop.update(mean, m2 / count, count)
        return pop

    def _update(self, mean: Array, var: Array, count: float) -> None:
        self._absorb(count, mean, var * count)

    def _absorb(self, count: float, mean: Array, m2: Array) -> None:
        """Merge ``(count, mean, m2)`` into the running ``(mean, m2)``; ``self.count`` is the
        caller's to advance."""
        if self._mean_acc is None:
            self._mean_acc, self._m2 = mean * 1, m2 * 1
            return
        self._mean_acc, self._m2 = chan_merge(self.count, self._mean_acc, self._m2, count, mean, m2)

    def merge(self, other: Population) -> Population:
        """A new Population over the values of both ``self`` and ``other``; neither changes."""
        if not isinstance(other, Population):
            raise TypeError(f"can only merge a Population with a Population, not {type(other)}")
        if self._shape and other._shape and self._shape != other._shape:
            raise ValueError(f"cannot merge Populations of shapes {self._shape} and {other._shape}")
        merged = Population(nonfinite=self.nonfinite)
        for part in (self, other):
            if part.count > 0:
                merged._merge_in(part)
        return merged

    def _merge_in(self, other: Population) -> None:
        self._absorb(other.count, other._mean_acc, other._m2)
        self._shape = tuple(other._mean_acc.shape)
        self.count += other.count
        self.num_batches_tracked += other.num_batches_tracked

    @property
    def mean(self) -> Array | None:
        return self._mean_acc

    @property
    def m2(self) -> Array | None:
        """Sum of squared deviations from the mean, over every value seen."""
        return self._m2

    @property
    def biased_var(self) -> Array | None:
        """``m2 / count``: the population variance without Bessel's correction."""
        return None if self._m2 is None else self._m2 / self.count

    @property
    def var(self) -> Array | None:
        if self._m2 is None:
            return None
        if self.count < 2:
            raise ValueError("Population has seen 1 value per channel; var needs at least 2")
        return self._m2 / (self.count - 1)


def chan_merge(
    count_a: float, mean_a: Array, m2_a: Array, count_b: float, mean_b: Array, m2_b: Array
) -> tuple[Array, Array]:
    """Merge two sets' ``(count, mean, m2)`` into the union's ``(mean, m2)`` (Chan et al. 1979).

    ``delta = mean_b - mean_a``; ``mean = mean_a + delta * count_b / count``;
    ``m2 = m2_a + m2_b + delta**2 * count_a * count_b / count``, ``count = count_a + count_b``.
    """
    count = count_a + count_b
    delta = mean_b - mean_a
    mean = mean_a + delta * (count_b / count)
    m2 = m2_a + m2_b + delta * delta * (count_a * count_b / count)
    return mean, m2


def estimator_from_state(state: dict[str, Any]) -> Estimator:
    """Rebuild any estimator from its :meth:`Estimator.state_dict`."""
    kinds: dict[str, type[Estimator]] = {
        "EMA": EMA,
        "CumulativeAverage": CumulativeAverage,
        "Population": Population,
    }
    kind = state.get("kind")
    if kind not in kinds:
        raise ValueError(f"unknown estimator kind {kind!r}; expected one of {sorted(kinds)}")
    cls = kinds[kind]
    config = {k: state[k] for k in cls._config_keys if k in state}
    estimator = cls(**config)
    estimator.load_state_dict(state)
    return estimator


__all__ = [
    "EMA",
    "CumulativeAverage",
    "Estimator",
    "NonFiniteStatisticsError",
    "Population",
    "chan_merge",
    "decay_from_momentum",
    "estimator_from_state",
    "momentum_from_decay",
]
