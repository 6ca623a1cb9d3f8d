"""Estimators of batch norm's test-time statistics.

During training, batch norm normalizes a layer's pre-activations ``z`` with the mini-batch's
own ``mu`` and ``var``. At test time a fixed estimate is needed. Each estimator here takes the
per-batch statistics, one batch at a time, and keeps such an estimate:

- :class:`EMA`: the exponentially weighted (running) average of the lecture and of PyTorch,
  optionally bias-corrected;
- :class:`CumulativeAverage`: every batch weighted equally (PyTorch's ``momentum=None``);
- :class:`Population`: the exact mean and variance of every sample seen, mergeable
  (:mod:`bnstats.precision` says how precise they are from the spread between batches).

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

import math
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np

from bnstats._array import (
    Array,
    all_finite,
    as_array,
    clamp_min,
    column,
    concat,
    copy,
    is_torch,
    where,
    widen,
)

NonFinitePolicy = Literal["raise", "skip"]
_TINY = float(np.finfo(np.float64).tiny)


class NonFiniteStatisticsError(ValueError):
    """A batch brought NaN or Inf statistics; the estimate was left as it was."""


def momentum_from_decay(decay: float) -> float:
    """PyTorch ``momentum`` from a decay factor (the lecture's beta, Keras/Flax ``momentum``).

    The lecture writes ``v = beta * v + (1 - beta) * theta``: beta weighs the OLD value.
    PyTorch's momentum weighs the NEW batch, so ``momentum = 1 - beta``; Keras' default 0.99
    is PyTorch's 0.01.

    The difference is rounded to 15 decimal places (:func:`_complement`), so the result
    compares equal to the number a user writes: ``momentum_from_decay(0.99) == 0.01``
    (plain ``1 - 0.99`` is ``0.010000000000000009``).
    """
    _check_fraction(decay, "decay")
    return _complement(decay)


def decay_from_momentum(momentum: float) -> float:
    """The decay factor (lecture's beta, Keras/Flax ``momentum``) for a PyTorch ``momentum``:
    ``1 - momentum``, rounded to 15 decimal places as in :func:`momentum_from_decay`."""
    _check_fraction(momentum, "momentum")
    return _complement(momentum)


def _complement(value: float) -> float:
    """``1 - value`` rounded to 15 decimal places: the float nearest to the decimal a user wrote.

    A fraction in [0, 1] is stored to about 1e-16; ``1 - 0.99`` keeps that representation
    error (``0.010000000000000009``). Rounding to 15 decimals drops it and moves any result by
    at most 5e-16, below the precision the input itself carried.
    """
    return round(1.0 - float(value), 15)


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

        ``mean`` and ``var`` are NumPy arrays, torch tensors, or anything ``numpy.asarray``
        takes (lists, floats). Raises :class:`NonFiniteStatisticsError` for NaN/Inf inputs or
        an update that would overflow to Inf (or, with ``nonfinite="skip"``, ignores the batch
        and counts it in ``num_batches_skipped``), ``ValueError`` for mismatched shapes, a
        negative variance or a count that is not a finite positive number, and ``TypeError``
        for torch statistics fed to an estimator holding NumPy ones, or the reverse.
        """
        mean, var = as_array(mean), as_array(var)
        if isinstance(count, np.generic):
            count = count.item()  # a NumPy scalar: a Python number in the state (saved as JSON)
        self._check_batch(mean, var, count)
        state = self._state_arrays()
        if not (all_finite(mean) and all_finite(var)):
            self._skip_or_raise(f"the batch statistics contain NaN or Inf (count={count})")
            return
        with np.errstate(over="ignore", invalid="ignore"):  # overflow is checked just below
            self._update(widen(mean), widen(var), count)
        if not all(all_finite(value) for value in self._state_arrays()):
            self._restore_state_arrays(state)
            self._skip_or_raise(f"the update overflows to Inf (count={count})")
            return
        self._shape = tuple(mean.shape)
        self.count += count
        self.num_batches_tracked += 1

    def update_sequence(self, counts: Sequence[float], means: Array, variances: Array) -> None:
        """Take ``B`` batches in order, as ``B`` calls of :meth:`update` would: ``means`` and
        biased ``variances`` of shape (B, C), ``counts`` (B,) values per channel.
        :class:`RunningAverage` does it faster, with the same result."""
        if not len(counts) == len(means) == len(variances):
            raise ValueError(
                f"{type(self).__name__}.update_sequence: {len(counts)} counts for "
                f"{len(means)} means and {len(variances)} variances"
            )
        for count, mean, var in zip(counts, means, variances, strict=True):
            self.update(mean, var, count)

    def _skip_or_raise(self, problem: str) -> None:
        if self.nonfinite == "skip":
            self.num_batches_skipped += 1
            return
        raise NonFiniteStatisticsError(
            f"{type(self).__name__}: {problem}; the estimate was left unchanged. "
            "Pass nonfinite='skip' to ignore such batches."
        )

    def _state_arrays(self) -> list[Array]:
        return [v for v in (getattr(self, "_" + k) for k in self._state_keys) if v is not None]

    def _restore_state_arrays(self, arrays: list[Array]) -> None:
        keys = [k for k in self._state_keys if getattr(self, "_" + k) is not None]
        if len(arrays) != len(keys):  # the first batch: there was no state before it
            for key in self._state_keys:
                setattr(self, "_" + key, None)
            return
        for key, value in zip(keys, arrays, strict=True):
            setattr(self, "_" + key, value)

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
        if isinstance(count, bool) or not (0 < float(count) < math.inf):
            raise ValueError(
                f"{type(self).__name__}.update: count must be a finite positive number, "
                f"got {count!r}"
            )
        held = self._state_arrays()
        if held and is_torch(held[0]) != is_torch(mean):
            kinds = ("torch tensors", "NumPy arrays")
            have, got = kinds if is_torch(held[0]) else kinds[::-1]
            raise TypeError(
                f"{type(self).__name__}.update: this estimator holds {have}; got {got} "
                "(convert one side, or use one estimator per kind)"
            )
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
        """Restore a state from :meth:`state_dict`; the kind must match. Everything is checked
        before anything changes: ``ValueError`` for another kind, a missing key or a count
        that is not a finite number >= 0, :class:`NonFiniteStatisticsError` for NaN or Inf
        statistics."""
        kind = state.get("kind")
        if kind != type(self).__name__:
            raise ValueError(f"cannot load a {kind!r} state into a {type(self).__name__}")
        missing = [k for k in (*self._config_keys, *self._state_keys, "count") if k not in state]
        if missing:
            raise ValueError(f"{type(self).__name__} state is missing {missing}")
        count = state["count"]
        if isinstance(count, bool) or not 0 <= float(count) < math.inf:
            raise ValueError(
                f"{type(self).__name__}.load_state_dict: count must be a finite number >= 0, "
                f"got {count!r}"
            )
        arrays = {key: _loaded_array(self, key, state[key]) for key in self._state_keys}
        for key in self._config_keys:
            setattr(self, key, state[key])
        self.count = count
        self.num_batches_tracked = int(state.get("num_batches_tracked", 0))
        self.num_batches_skipped = int(state.get("num_batches_skipped", 0))
        self._shape = None
        for key, value in arrays.items():
            setattr(self, "_" + key, value)
            if value is not None:
                self._shape = tuple(value.shape)

    def __repr__(self) -> str:
        config = ", ".join(f"{k}={getattr(self, k)!r}" for k in self._config_keys)
        return f"{type(self).__name__}({config}, batches={self.num_batches_tracked})"


def _loaded_array(estimator: Estimator, key: str, value: Any) -> Array | None:
    """A state array from a state dict, widened and copied; NaN or Inf refused."""
    if value is None:
        return None
    array = copy(widen(as_array(value)))
    if not all_finite(array):
        raise NonFiniteStatisticsError(
            f"{type(estimator).__name__}.load_state_dict: {key!r} holds NaN or Inf; nothing "
            "was loaded"
        )
    return array


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
    batch (``w_1 = 1``). :meth:`weight` is the one place a schedule lives: this class, the
    engine and bnstats' torch BN modules (eager, ``torch.compile`` and ``torch.fx``) all ask
    it, so a subclass needs nothing else.
    """

    _state_keys = ("running_mean", "running_var")
    starts_at_zero_one = False
    weight_depends_on_step = True
    """False when :meth:`weight` is the same at every step (the plain EMA): then a torch BN
    module need not follow the step on the host."""

    def reset(self) -> None:
        super().reset()
        self._running_mean: Array | None = None
        self._running_var: Array | None = None

    def weight(self, t: Any) -> Any:
        """Weight ``w_t`` of batch number ``t`` (1-based).

        ``t`` is a Python int, or, in bnstats' torch BN modules under ``torch.compile``,
        ``torch.fx`` or ``torch.export``, a float64 tensor ``num_batches_tracked + 1`` on the
        module's device (a traced value: never read on the host). Write the schedule with
        arithmetic that takes both (``t ** 0.5``, not ``math.sqrt(t)``; a choice with
        :func:`bnstats._array.where`); a constant may be returned as a float.
        """
        raise NotImplementedError

    def load_running(
        self, mean: Array | None, var: Array | None, num_batches_tracked: int, skipped: int = 0
    ) -> None:
        """Take a running state kept elsewhere (a torch BN module's buffers): ``mean`` and
        ``var`` (copied; ignored while ``num_batches_tracked`` is 0) and the batch counts.
        ``count`` stays 0: a running average does not need it."""
        self.reset()
        if mean is not None and var is not None and num_batches_tracked > 0:
            self._running_mean, self._running_var = copy(mean), copy(var)
            self._shape = tuple(mean.shape)
            self.num_batches_tracked = int(num_batches_tracked)
        self.num_batches_skipped = int(skipped)

    def _update(self, mean: Array, var: Array, count: float) -> None:
        batch_var = _unbiased(var, count)
        if self._running_mean is None:
            self._running_mean, self._running_var = self._start(mean, var)
        w = self.weight(self.num_batches_tracked + 1)
        self._running_mean = (1 - w) * self._running_mean + w * mean
        self._running_var = (1 - w) * self._running_var + w * batch_var

    def _start(self, mean: Array, var: Array) -> tuple[Array, Array]:
        """The running ``(mean, var)`` before the first batch, shaped like it."""
        return mean * 0, var * 0 + (1 if self.starts_at_zero_one else 0)

    def update_sequence(self, counts: Sequence[float], means: Array, variances: Array) -> None:
        """Take ``B`` batches in order: ``means`` and biased ``variances`` of shape (B, C),
        ``counts`` (B,) values per channel. Ends exactly, bit for bit, where ``B`` calls of
        :meth:`update` end, at a fraction of their cost: what does not depend on the running
        state is computed for all batches at once, which leaves, per batch ``t``, ::

            running = (1 - w_t) * running + w_t * [mean_t, var_t * n_t / (n_t - 1)]

        the same operations on the same numbers as :meth:`update`. If any batch is one that
        :meth:`update` refuses or skips (a wrong shape, a count below 2, a negative, NaN or
        Inf value), or an update overflows, the batches go through :meth:`update` one by one
        instead, so that errors and ``nonfinite="skip"`` behave exactly as there.
        """
        means, variances = as_array(means), as_array(variances)
        running = (
            self._replayed(counts, means, variances)
            if self._takes_all(counts, means, variances)
            else None
        )
        if running is None:
            super().update_sequence(counts, means, variances)
            return
        channels = means.shape[1]
        self._running_mean, self._running_var = copy(running[:channels]), copy(running[channels:])
        self._shape = tuple(means.shape[1:])
        for count in counts:
            self.count += count
        self.num_batches_tracked += len(counts)

    def _replayed(self, counts: Sequence[float], means: Array, variances: Array) -> Array | None:
        """``[running_mean, running_var]`` after the batches (checked by :meth:`_takes_all`),
        or None if an update overflows. Changes nothing."""
        means, variances = widen(means), widen(variances)
        first = self.num_batches_tracked + 1
        w = [self.weight(t) for t in range(first, first + len(counts))]
        keep, weights = [1 - w_t for w_t in w], column(w, means)
        if self._running_mean is None:
            running = concat(list(self._start(means[0], variances[0])))
        else:
            running = concat([self._running_mean, self._running_var])
        with np.errstate(over="ignore", invalid="ignore"):  # overflow is checked just below
            unbiased = column([n / (n - 1) for n in counts], variances) * variances
            fresh = concat([weights * means, weights * unbiased], axis=1)
            for t, keep_t in enumerate(keep):
                running = keep_t * running + fresh[t]
        return running if all_finite(running) else None

    def _takes_all(self, counts: Sequence[float], means: Array, variances: Array) -> bool:
        """Whether :meth:`update` would take every batch as it is, changing the estimate."""
        shape = tuple(means.shape)
        if len(shape) != 2 or tuple(variances.shape) != shape or not 0 < len(counts) == shape[0]:
            return False
        if self._shape is not None and shape[1:] != self._shape:
            return False
        held = self._state_arrays()
        if held and is_torch(held[0]) != is_torch(means):
            return False
        if any(isinstance(n, bool) or not 2 <= float(n) < math.inf for n in counts):
            return False
        return all_finite(means) and all_finite(variances) and not bool((variances < 0).any())

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
        """An EMA from the lecture's beta (Keras/Flax ``momentum``): ``momentum = 1 - decay``;
        ``ValueError`` for a decay of 1 (to 15 decimals: the statistics would never move)."""
        momentum = momentum_from_decay(decay)
        if momentum == 0:
            raise ValueError(
                f"EMA.from_decay: decay {decay!r} is 1 to 15 decimals, so the average would "
                "never move; an EMA needs decay < 1 (FixedStatistics keeps statistics fixed)"
            )
        return cls(momentum, debias=debias)

    @property
    def starts_at_zero_one(self) -> bool:  # type: ignore[override]
        return not self.debias

    @property
    def weight_depends_on_step(self) -> bool:  # type: ignore[override]
        return self.debias

    def weight(self, t: Any) -> Any:
        if not self.debias:
            return self.momentum
        corrected = self.momentum / (1.0 - (1.0 - self.momentum) ** t)
        return where(t == 1, 1.0, corrected)  # exactly 1 at t = 1, where rounding may miss it


class CumulativeAverage(RunningAverage):
    """Every batch weighted equally: the mean of the batch means and of the unbiased variances.

    PyTorch's ``momentum=None`` (``w_t = 1 / t``): after ``t`` batches
    ``running_mean = sum(mean_k) / t`` and
    ``running_var = sum(var_k * count_k / (count_k - 1)) / t``,
    the test-time statistics of Ioffe & Szegedy (2015).
    """

    def weight(self, t: Any) -> Any:
        return 1.0 / t


class FixedStatistics(RunningAverage):
    """PyTorch's ``momentum=0.0``: ``w_t = 0``, the running statistics never move from where
    they start (0 and 1, or what a BN module's buffers hold); batches are still counted."""

    momentum = 0.0
    starts_at_zero_one = True
    weight_depends_on_step = False

    def weight(self, t: Any) -> Any:
        return 0.0


class Population(Estimator):
    """The exact mean and unbiased variance of every value seen, each sample weighted equally.

    The one accumulator of bnstats: the engine, the torch passes and the merges across
    processes all keep ``(count, mean, m2)`` here, ``m2 = sum((z - mean)**2)``. A batch enters
    as ``(count, mean, var * count)``; two sets merge with the parallel formula of Chan,
    Golub & LeVeque (1979)::

        delta = mean_b - mean_a
        count = count_a + count_b
        mean  = mean_a + delta * count_b / count
        m2    = m2_a + m2_b + delta**2 * count_a * count_b / count

    and many batches ``k`` at once (:meth:`update_batches`) first pool into one group::

        count_g = sum(count_k);   mean_g = sum(count_k * mean_k) / count_g
        m2_g    = sum(m2_k) + sum(count_k * (mean_k - mean_g)**2)

    ``var = m2 / (count - 1)``. Never ``E[z**2] - E[z]**2``, which cancels catastrophically
    when the mean dwarfs the spread. :meth:`to_flat` / :meth:`from_flat` give a float64 vector
    for collectives.
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

    def _absorb(self, count: Any, mean: Array, m2: Array) -> None:
        """Merge ``(count, mean, m2)`` into the running ``(mean, m2)``; ``self.count`` is the
        caller's to advance."""
        if self._mean_acc is None:
            self._mean_acc, self._m2 = mean * 1, m2 * 1
            return
        self._mean_acc, self._m2 = chan_merge(self.count, self._mean_acc, self._m2, count, mean, m2)

    def update_batches(self, counts: Any, means: Array, m2s: Array) -> None:
        """Merge many batches at once: ``counts`` (B,) values per channel, ``means`` and ``m2s``
        (B, C), pooled into one group (see the class docstring), then merged in.

        Vectorised and free of host reads: ``counts`` may be a list of numbers or an array or
        tensor beside ``means`` (a batch of count 0 weighs nothing, whatever its ``means`` and
        ``m2s`` hold, NaN included; batches that all have count 0 leave the Population as it
        was). No other finiteness check: a NaN batch of positive count makes the result NaN,
        for the caller to test once at the end.
        """
        means, m2s = widen(means), widen(m2s)
        weights = column(counts, means)
        total = weights.sum()
        if not is_torch(weights) and not total > 0:
            return
        mean, m2 = pooled_batches(weights, total, means, m2s)
        self.absorb_pooled(total, mean, m2, len(weights))

    def absorb_pooled(self, total: Any, mean: Array, m2: Array, batches: int) -> None:
        """Merge in a group of ``batches`` batches already pooled (:func:`pooled_batches`):
        ``total`` values per channel with this ``mean`` and ``m2``, which the Population
        takes as they are (no copy: they are the caller's fresh results, not to be changed)."""
        if self._mean_acc is None:
            self._shape = tuple(mean.shape)
            self._mean_acc, self._m2 = mean, m2
            self.count = total if not self.count else self.count + total
        else:
            self._absorb(total, mean, m2)
            self.count = self.count + total
        self.num_batches_tracked += batches

    def merge(self, other: Population) -> Population:
        """A new Population over the values of both ``self`` and ``other``; neither changes."""
        if not isinstance(other, Population):
            raise TypeError(f"can only merge a Population with a Population, not {type(other)}")
        shapes = [part._shape for part in (self, other) if part._mean_acc is not None]
        if len(shapes) == 2 and shapes[0] != shapes[1]:
            raise ValueError(f"cannot merge Populations of shapes {shapes[0]} and {shapes[1]}")
        if len(shapes) == 2 and is_torch(self._mean_acc) != is_torch(other._mean_acc):
            raise TypeError("cannot merge a Population of torch tensors with one of NumPy arrays")
        merged = Population(nonfinite=self.nonfinite)
        for part in (self, other):
            if part._mean_acc is not None:
                merged._merge_in(part)
        return merged

    def _merge_in(self, other: Population) -> None:
        self._absorb(other.count, other._mean_acc, other._m2)
        self._shape = tuple(other._mean_acc.shape)
        self.count = self.count + other.count
        self.num_batches_tracked += other.num_batches_tracked

    def _replaced(self, mean: Array, m2: Array) -> Population:
        """A Population of the same count and batches holding this ``mean`` and ``m2``."""
        pop = Population(nonfinite=self.nonfinite)
        pop._mean_acc, pop._m2, pop._shape = mean, m2, tuple(mean.shape)
        pop.count, pop.num_batches_tracked = self.count, self.num_batches_tracked
        return pop

    def to_flat(self, channels: int) -> Array:
        """``[count, batches, mean (C), m2 (C)]`` as one float64 vector of the state's kind
        (a NumPy vector of zeros for an empty Population; ``channels`` fixes its length)."""
        if self._mean_acc is None:
            return np.zeros(2 + 2 * channels)
        header = self._mean_acc[:2] * 0
        header[0] = self.count
        header[1] = self.num_batches_tracked
        return concat([header, self._mean_acc, self._m2])

    @classmethod
    def from_flat(cls, flat: Array) -> Population:
        """The Population of :meth:`to_flat`'s vector (its length gives the channels)."""
        channels = (len(flat) - 2) // 2
        pop = cls()
        if float(flat[0]) > 0:
            pop._mean_acc = widen(flat[2 : 2 + channels]) * 1
            pop._m2 = widen(flat[2 + channels : 2 + 2 * channels]) * 1
            pop._shape = (channels,)
            pop.count = float(flat[0])
            pop.num_batches_tracked = int(flat[1])
        return pop

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


def pooled_batches(
    weights: Array, total: Any, means: Array, m2s: Array | None, finite: bool = False
) -> tuple[Array, Array]:
    """Batches ``k`` pooled into one group (:class:`Population`'s formula)::

        mean_g = sum(w_k * mean_k) / total,   m2_g = sum(m2_k) + sum(w_k * (mean_k - mean_g)**2)

    ``weights`` (B, 1), one count per batch, or (B, C), one per batch and channel (or any
    shape that broadcasts against ``means``, the batches along the first axis), and ``total``
    their sum over the batches; a batch of weight 0 weighs nothing, whatever its ``means`` and
    ``m2s`` hold (NaN included; ``finite=True``: the caller has set them to 0 already);
    ``m2s`` None: single values (``m2_k = 0``); an empty group has
    mean 0 and m2 0."""
    weighed = None if finite else weights > 0
    if weighed is not None:
        means = where(weighed, means, 0.0)
    mean = (weights * means).sum(axis=0) / clamp_min(total, _TINY)
    deviation = means - mean
    m2 = (weights * deviation * deviation).sum(axis=0)
    if m2s is None:
        return mean, m2
    return mean, m2 + (m2s if weighed is None else where(weighed, m2s, 0.0)).sum(axis=0)


def chan_merge(
    count_a: float, mean_a: Array, m2_a: Array, count_b: float, mean_b: Array, m2_b: Array
) -> tuple[Array, Array]:
    """Merge two sets' ``(count, mean, m2)`` into the union's ``(mean, m2)`` (Chan et al. 1979).

    ``delta = mean_b - mean_a``; ``mean = mean_a + delta * count_b / count``;
    ``m2 = m2_a + m2_b + delta**2 * count_a * count_b / count``, ``count = count_a + count_b``.
    Two empty sets (``count == 0``, tensors whose count is not read on the host) merge into
    ``mean_a`` and ``m2_a + m2_b`` instead of NaN.
    """
    count = count_a + count_b
    safe_count = clamp_min(count, _TINY)
    delta = mean_b - mean_a
    mean = mean_a + delta * (count_b / safe_count)
    m2 = m2_a + m2_b + delta * delta * (count_a * count_b / safe_count)
    return mean, m2


def estimator_from_state(state: dict[str, Any]) -> Estimator:
    """Rebuild any estimator from its :meth:`Estimator.state_dict`."""
    kinds: dict[str, type[Estimator]] = {
        "EMA": EMA,
        "CumulativeAverage": CumulativeAverage,
        "FixedStatistics": FixedStatistics,
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
    "FixedStatistics",
    "NonFiniteStatisticsError",
    "Population",
    "chan_merge",
    "decay_from_momentum",
    "estimator_from_state",
    "momentum_from_decay",
    "pooled_batches",
]
