"""Batch-norm statistics between frameworks: PyTorch, Keras 3, TensorFlow, Flax, ONNX, Haiku.

NumPy only: nothing here imports a framework. Every framework computes the same test-time
layer, with the lecture's names::

    z_tilde = gamma * (z - mu) / sqrt(var + eps) + beta

but stores ``mu`` and ``var`` under its own names, updates them with its own meaning of
``momentum`` and its own variance, and defaults to its own ``eps``:

- ``momentum``: PyTorch's weighs the NEWEST batch, ``new = (1 - momentum) * old + momentum *
  batch``; Keras, TensorFlow, Flax (Linen and NNX), ONNX, Haiku (``decay_rate``) and Equinox
  weigh the OLD value, ``new = momentum * old + (1 - momentum) * batch``. The two are
  ``1 - momentum`` of each other (:func:`bnstats.momentum_from_decay`). PyTorch's
  ``momentum=None`` (a cumulative average) has no counterpart elsewhere.
- the running variance: PyTorch (and TensorFlow's fused kernel, the default of Keras 2 for
  4-D inputs) averages the UNBIASED batch variance ``m2 / (count - 1)``; Keras 3, Flax,
  ONNX, Haiku and Equinox average the BIASED one ``m2 / count``. The exact factor between the
  two is ``count / (count - 1)``, with ``count`` the values per channel in ONE training
  batch (batch size times spatial positions): it cannot be recovered from the stored numbers.
- ``eps``: 1e-5 in PyTorch, Flax, ONNX, Haiku and Equinox; 1e-3 in Keras and TensorFlow.
  A ported layer keeps the eps it was trained with, whatever the target's default.
- Haiku keeps zero-debiased averages (Kingma & Ba 2015): a ``hidden`` average that starts
  at zero and the ``average = hidden / (1 - decay**counter)`` the layer uses.

:func:`port` moves one layer's statistics and hyperparameters from one convention to
another; :func:`convert_momentum` converts a momentum alone; :func:`debiased_average` and
:func:`zero_debiased_hidden` go between Haiku's two averages.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from bnstats.stats import momentum_from_decay


@dataclass(frozen=True)
class Convention:
    """How one framework stores and updates a batch-norm layer's statistics.

    ``keys`` are the names of ``(gamma, beta, mu, var)`` in its state; ``momentum_key`` and
    ``eps_key`` name its hyperparameters; ``momentum_weighs`` says whether its momentum is
    the weight of the ``"new"`` batch (PyTorch) or of the ``"old"`` average; ``variance`` is
    what its running variance averages (``"unbiased"`` or ``"biased"`` batch variances).
    ``default_momentum`` is in the framework's own meaning (``None``: it has none).
    """

    name: str
    keys: tuple[str, str, str, str]
    momentum_key: str
    eps_key: str
    momentum_weighs: Literal["new", "old"]
    default_momentum: float | None
    default_eps: float
    variance: Literal["unbiased", "biased"]
    zero_debiased: bool = False


CONVENTIONS: dict[str, Convention] = {
    c.name: c
    for c in (
        Convention(
            "torch", ("weight", "bias", "running_mean", "running_var"), "momentum", "eps",
            "new", 0.1, 1e-5, "unbiased",
        ),
        Convention(
            "keras", ("gamma", "beta", "moving_mean", "moving_variance"), "momentum",
            "epsilon", "old", 0.99, 1e-3, "biased",
        ),
        Convention(
            "tensorflow", ("gamma", "beta", "moving_mean", "moving_variance"), "momentum",
            "epsilon", "old", 0.99, 1e-3, "unbiased",
        ),
        Convention(
            "flax", ("scale", "bias", "mean", "var"), "momentum", "epsilon",
            "old", 0.99, 1e-5, "biased",
        ),
        Convention(
            "onnx", ("scale", "B", "input_mean", "input_var"), "momentum", "epsilon",
            "old", 0.9, 1e-5, "biased",
        ),
        Convention(
            "haiku", ("scale", "offset", "mean_ema", "var_ema"), "decay_rate", "eps",
            "old", None, 1e-5, "biased", zero_debiased=True,
        ),
        Convention(
            "equinox", ("weight", "bias", "running_mean", "running_var"), "momentum", "eps",
            "old", 0.99, 1e-5, "biased",
        ),
    )
}  # fmt: skip
"""The known conventions. ``"flax"`` is Linen's ``BatchNorm`` (params ``scale``/``bias``,
batch_stats ``mean``/``var``) and NNX's (attributes of the same names); ``"tensorflow"`` is
Keras 2's ``tf.keras`` layer with the fused kernel (4-D inputs); unfused, it is ``"keras"``.
``"equinox"`` names the two arrays of ``eqx.nn.BatchNorm``'s state ``running_mean`` and
``running_var``."""


@dataclass(frozen=True)
class Ported:
    """The result of :func:`port`: ``state`` in the target's names (arrays as float64 NumPy,
    plus its momentum and eps keys) and ``notes``, one plain sentence for each thing the user
    must know or do (an eps that differs from the target's default, a variance kept as it
    was, a default that was assumed)."""

    state: dict[str, Any]
    notes: tuple[str, ...]


def convention(name: str) -> Convention:
    """The :class:`Convention` called ``name``; ``ValueError`` listing the known ones."""
    try:
        return CONVENTIONS[name]
    except (KeyError, TypeError):
        known = ", ".join(sorted(CONVENTIONS))
        raise ValueError(f"unknown convention {name!r}; known: {known}") from None


def convert_momentum(momentum: float | None, *, source: str, target: str) -> float | None:
    """``momentum`` of convention ``source`` in the meaning of ``target``.

    Same meaning: unchanged; PyTorch's ``m`` and the others' ``beta``: ``beta = 1 - m``.
    PyTorch's ``momentum=None`` (every batch weighted equally) stays ``None`` for PyTorch and
    has no equivalent elsewhere: ``ValueError`` (writing it as 1.0, as some exporters did,
    keeps only the old value: the statistics never move).
    """
    src, dst = convention(source), convention(target)
    if momentum is None:
        if src.name == "torch" and dst.name == "torch":
            return None
        if src.name != "torch":
            raise ValueError(
                f"momentum=None (a cumulative average) is PyTorch's alone; {src.name} has no "
                f"such setting: give its {src.momentum_key}"
            )
        raise ValueError(
            f"{src.name} momentum=None is a cumulative average (every batch weighted equally); "
            f"{dst.name} has no equivalent: choose a momentum for the ported layer"
        )
    if not 0.0 <= float(momentum) <= 1.0:
        raise ValueError(f"{src.name} {src.momentum_key} must lie in [0, 1], got {momentum!r}")
    if src.momentum_weighs == dst.momentum_weighs:
        return float(momentum)
    return momentum_from_decay(float(momentum))


def port(
    state: Mapping[str, Any],
    *,
    source: str,
    target: str,
    count: float | None = None,
) -> Ported:
    """One BN layer's statistics and hyperparameters, from ``source``'s convention to ``target``'s.

    ``state`` holds the source's names (see :data:`CONVENTIONS`): ``mu`` and ``var`` are
    required, ``gamma`` and ``beta`` are carried when present (a layer without them has
    none), the momentum and eps keys default to the source's defaults (with a note saying
    so). The result carries the same ``gamma``, ``beta``, ``mu``, the momentum converted by
    :func:`convert_momentum` and the SAME eps (not the target's default).

    The running variance:

    - ``count=None`` (default): the numbers are kept, so the ported layer computes exactly
      what the source computed at test time. If the two average different variances, a
      note says so: continued training would mix the two kinds.
    - ``count`` given (values per channel in one training batch, > 1): the variance is
      converted to the target's kind, ``unbiased = biased * count / (count - 1)`` or back,
      as training in the target framework would have stored it (exact when every training
      batch had ``count`` values). Test-time outputs then differ by that factor.

    Haiku's ``mean_ema``/``var_ema`` may be given as the average itself, as its state
    mapping with ``"average"``, or with ``"hidden"`` and ``"counter"`` (debiased with the
    decay); for a Haiku target they are the average (see :func:`zero_debiased_hidden`).

    Nothing is ported that would be a silently wrong number. Raises ``ValueError`` naming the
    key or convention for: unknown conventions; missing statistics; an array that is not real
    numbers (strings, complex, objects), not one value per channel, or holds NaN or an
    infinity; a negative variance; ``gamma``/``beta``/``mu``/``var`` of different lengths; a
    momentum or eps that is not a number, an eps that is negative, NaN or infinite; or
    ``count <= 1``. ``TypeError`` when ``state`` is not a mapping.
    """
    src, dst = convention(source), convention(target)
    if not isinstance(state, Mapping):
        raise TypeError(
            f"state must be a mapping of {src.name}'s names ({', '.join(src.keys)}) to "
            f"arrays, got {type(state).__name__}"
        )
    notes: list[str] = []
    momentum = _hyperparameter(state, src, src.momentum_key, src.default_momentum, notes)
    eps = _hyperparameter(state, src, src.eps_key, src.default_eps, notes)
    if eps is None or not 0.0 <= eps < math.inf:
        raise ValueError(f"{src.name} {src.eps_key} must be a finite number >= 0, got {eps!r}")
    ported = _parameters(state, src, dst)
    mean_key, var_key = src.keys[2], src.keys[3]
    mean = _statistic(state, src, mean_key, momentum)
    var = _statistic(state, src, var_key, momentum)
    if (var < 0).any():
        channels = np.flatnonzero(var < 0).tolist()
        raise ValueError(f"{src.name} {var_key} is negative in channel(s) {channels}")
    present = {
        key: ported[d] for key, d in zip(src.keys[:2], dst.keys[:2], strict=True) if d in ported
    }
    _check_lengths(src, {**present, mean_key: mean, var_key: var})
    ported[dst.keys[2]] = mean
    ported[dst.keys[3]] = _ported_variance(var, src, dst, count, notes)
    ported[dst.momentum_key] = convert_momentum(momentum, source=src.name, target=dst.name)
    ported[dst.eps_key] = float(eps)
    if float(eps) != dst.default_eps:
        notes.append(
            f"eps {float(eps):g} differs from {dst.name}'s default {dst.default_eps:g}: build "
            f"the {dst.name} layer with {dst.eps_key}={float(eps):g}"
        )
    return Ported(state=ported, notes=tuple(notes))


def _hyperparameter(
    state: Mapping[str, Any], src: Convention, key: str, default: float | None, notes: list[str]
) -> float | None:
    if key in state:
        value = state[key]
        if value is None:
            return None
        try:
            return float(_numbers(value, src, key))
        except TypeError:
            raise ValueError(f"{src.name} {key} must be one number, got {value!r}") from None
    if default is None:
        raise ValueError(f"{src.name} state has no {key!r} and {src.name} has no default for it")
    notes.append(f"{src.name} {key} not given: its default {default:g} was assumed")
    return default


def _parameters(state: Mapping[str, Any], src: Convention, dst: Convention) -> dict[str, Any]:
    ported = {}
    for source_key, target_key in zip(src.keys[:2], dst.keys[:2], strict=True):
        if source_key in state and state[source_key] is not None:
            ported[target_key] = _as_vector(state[source_key], src, source_key)
    return ported


def _check_lengths(src: Convention, arrays: dict[str, np.ndarray]) -> None:
    """Every array one value per channel of the same layer: one length for all."""
    lengths = {key: array.shape[0] for key, array in arrays.items()}
    if len(set(lengths.values())) > 1:
        listed = ", ".join(f"{key} has {n}" for key, n in lengths.items())
        raise ValueError(f"{src.name} arrays disagree on the number of channels: {listed}")


def _statistic(
    state: Mapping[str, Any], src: Convention, key: str, momentum: float | None
) -> np.ndarray:
    if key not in state:
        raise ValueError(f"{src.name} state has no {key!r} (needed: {src.keys[2]}, {src.keys[3]})")
    value = state[key]
    if src.zero_debiased and isinstance(value, Mapping):
        value = _haiku_average(value, src, key, momentum)
    return _as_vector(value, src, key)


def _haiku_average(
    value: Mapping[str, Any], src: Convention, key: str, decay: float | None
) -> np.ndarray:
    if "average" in value:
        return value["average"]
    if "hidden" in value and "counter" in value and decay is not None:
        hidden = _numbers(value["hidden"], src, f"{key}['hidden']")
        return debiased_average(hidden, decay=decay, steps=value["counter"])
    raise ValueError(
        f"{src.name} {key} needs 'average', or 'hidden' and 'counter' with {src.momentum_key}"
    )


def _as_vector(value: Any, src: Convention, key: str) -> np.ndarray:
    array = _numbers(value, src, key)
    if array.ndim != 1:
        raise ValueError(f"{src.name} {key} must be one value per channel, got shape {array.shape}")
    if not np.isfinite(array).all():
        channels = np.flatnonzero(~np.isfinite(array)).tolist()
        raise ValueError(f"{src.name} {key} is NaN or infinite in channel(s) {channels}")
    return array.copy()


def _numbers(value: Any, src: Convention, key: str) -> np.ndarray:
    """``value`` as float64, refusing what would convert to a wrong number: strings (even
    ``"0.1"``), booleans, objects, and complex values (whose imaginary part would be lost)."""
    try:
        raw = np.asarray(value)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{src.name} {key} is not an array of numbers: {error}") from None
    if raw.dtype.kind == "c":
        raise ValueError(f"{src.name} {key} is complex ({raw.dtype}): give real numbers")
    if raw.dtype.kind not in "iuf":
        raise ValueError(f"{src.name} {key} must hold real numbers, got dtype {raw.dtype}")
    return raw.astype(np.float64)


def _ported_variance(
    var: np.ndarray, src: Convention, dst: Convention, count: float | None, notes: list[str]
) -> np.ndarray:
    if count is not None and not float(count) > 1.0:
        raise ValueError(f"count must be the values per channel in one batch (> 1), got {count}")
    if src.variance == dst.variance:
        return var
    if count is None:
        notes.append(
            f"{dst.keys[3]} kept as stored: {src.name} averaged {src.variance} batch "
            f"variances, {dst.name} averages {dst.variance} ones; the outputs are identical, "
            f"but pass count= (values per channel in one training batch) to convert before "
            f"training on (factor count / (count - 1))"
        )
        return var
    factor = _bessel(float(count))
    return var * factor if dst.variance == "unbiased" else var / factor


def _bessel(count: float) -> float:
    return 1.0 if math.isinf(count) else count / (count - 1.0)


def debiased_average(hidden: Any, *, decay: float, steps: int) -> np.ndarray:
    """Haiku's zero-debiased average: ``average = hidden / (1 - decay**steps)``.

    ``hidden`` starts at zero and follows ``hidden = decay * hidden + (1 - decay) * batch``;
    after ``steps`` updates dividing by ``1 - decay**steps`` removes the pull toward zero
    (Kingma & Ba 2015). ``bnstats.EMA(momentum_from_decay(decay), debias=True).mean`` is
    the same number.
    """
    return np.asarray(hidden, dtype=np.float64) / _zero_bias(decay, steps)


def zero_debiased_hidden(average: Any, *, decay: float, steps: int) -> np.ndarray:
    """The ``hidden`` value Haiku keeps for an ``average`` after ``steps`` updates: the
    inverse of :func:`debiased_average`, ``hidden = average * (1 - decay**steps)``."""
    return np.asarray(average, dtype=np.float64) * _zero_bias(decay, steps)


def _zero_bias(decay: float, steps: int) -> float:
    """``1 - decay**steps``, the weight the zero-started average has put on the batches."""
    steps = int(np.asarray(steps))
    if steps < 1:
        raise ValueError(f"steps must be >= 1 (updates made), got {steps}")
    if not 0.0 <= float(decay) < 1.0:
        raise ValueError(f"decay must lie in [0, 1), got {decay!r}")
    return 1.0 - float(decay) ** steps


__all__ = [
    "CONVENTIONS",
    "Convention",
    "Ported",
    "convention",
    "convert_momentum",
    "debiased_average",
    "port",
    "zero_debiased_hidden",
]
