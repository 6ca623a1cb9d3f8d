"""The numbers behind the lecture's picture: one layer's per-batch ``mu`` and ``var`` at every
training step, the EMA and debiased EMA after each step, and the population value.

The history keeps the *biased* batch variance ``var = sum((z - mu)**2) / n``; the estimators
hold the unbiased one, so :func:`unbiased_batch_var` converts the batch values with Bessel's
correction ``var * n / (n - 1)``, ``n`` the rows of that step's batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from bnstats.engine import History, Network
from bnstats.engine.layers import BatchNorm
from bnstats.methods import DEBIASED_EMA, POPULATION, RUNNING_EMA

DEFAULT_UNIT_COUNT = 3
"""How many units the picture shows when none are chosen: the layer's first three."""

STATS = ("mean", "var")
EMA_KEY, DEBIASED_KEY, POPULATION_KEY = RUNNING_EMA.name, DEBIASED_EMA.name, POPULATION.name


@dataclass(frozen=True)
class LectureTrace:
    """One statistic (``"mean"`` or ``"var"``) of one layer, every unit, every step.

    ``batch``, ``ema`` and ``ema_debiased`` have shape (steps, units); ``batch`` row ``t`` is
    step ``t``'s batch value (for ``var`` converted to unbiased) and the estimates are those
    after that batch. ``population`` (units,) is the exact value over the training set with
    the final weights. ``units`` are the units chosen for the figure; ``momentum`` is the
    EMA's (weight of the newest batch).
    """

    layer: str
    stat: str
    units: tuple[int, ...]
    momentum: float
    batch_size: np.ndarray
    batch: np.ndarray
    ema: np.ndarray
    ema_debiased: np.ndarray
    population: np.ndarray

    @property
    def steps(self) -> int:
        return len(self.batch)

    @property
    def features(self) -> int:
        return self.batch.shape[1]


def typical_batch_size(batch_size: np.ndarray) -> int:
    """The most common batch size of a run (the rest are an epoch's shorter last batches)."""
    sizes, counts = np.unique(np.asarray(batch_size), return_counts=True)
    return int(sizes[np.argmax(counts)])


def unbiased_batch_var(batch_var: np.ndarray, batch_size: np.ndarray) -> np.ndarray:
    """Bessel's correction per step: ``var * n / (n - 1)`` with ``n = batch_size[t]``.

    ``batch_var`` has shape (steps, units) and holds the biased batch variances the history
    records; ``batch_size`` (steps,) the rows of each step's batch (at least 2).
    """
    n = np.asarray(batch_size, dtype=np.float64)
    if n.ndim != 1 or len(n) != len(batch_var):
        raise ValueError(
            f"need one batch size per step: {len(batch_var)} steps, batch_size of shape {n.shape}"
        )
    if n.size and n.min() < 2:
        raise ValueError(f"a batch of {int(n.min())} row has no unbiased variance")
    return np.asarray(batch_var, dtype=np.float64) * (n / (n - 1))[:, None]


def choose_units(layer: BatchNorm, units: Sequence[int] | None) -> tuple[int, ...]:
    """``units`` checked against the layer's width, or its first :data:`DEFAULT_UNIT_COUNT`."""
    width = layer.num_features
    if units is None:
        return tuple(range(min(DEFAULT_UNIT_COUNT, width)))
    chosen = tuple(units)
    if not chosen:
        raise ValueError(f"choose at least one unit of layer {layer.name!r}")
    for unit in chosen:
        if isinstance(unit, bool) or not isinstance(unit, (int, np.integer)):
            raise ValueError(f"units must be whole numbers, got {unit!r}")
        if not 0 <= unit < width:
            raise ValueError(
                f"layer {layer.name!r} has {width} units (0 to {width - 1}); unit {unit} is not one"
            )
    if len(set(chosen)) != len(chosen):
        raise ValueError(f"units must not repeat, got {list(chosen)}")
    return tuple(int(u) for u in chosen)


def lecture_traces(
    history: History,
    net: Network,
    layer: str | None = None,
    units: Sequence[int] | None = None,
) -> dict[str, LectureTrace]:
    """``{"mean": ..., "var": ...}`` for BatchNorm ``layer`` (default: the first) and ``units``
    (default: its first three). The layer needs estimators ``ema`` and ``ema_debiased`` in the
    history and ``population`` (from :meth:`Network.recalibrate`) in the network."""
    bn = net.batchnorm_layer(layer)
    chosen = choose_units(bn, units)
    trace = history.layers.get(bn.name)
    if not trace:
        raise ValueError(f"the training history has no statistics of layer {bn.name!r}")
    _check_keys(bn, trace)
    ema = bn.estimators[EMA_KEY]
    sizes = np.asarray(history.batch_size)
    out = {}
    for stat in STATS:
        batch = np.stack(trace[f"batch_{stat}"]).astype(np.float64)
        if stat == "var":
            batch = unbiased_batch_var(batch, sizes)
        out[stat] = LectureTrace(
            layer=bn.name,
            stat=stat,
            units=chosen,
            momentum=float(ema.momentum),
            batch_size=sizes,
            batch=batch,
            ema=np.stack(trace[f"{EMA_KEY}_{stat}"]).astype(np.float64),
            ema_debiased=np.stack(trace[f"{DEBIASED_KEY}_{stat}"]).astype(np.float64),
            population=np.asarray(getattr(bn.estimators[POPULATION_KEY], stat), np.float64),
        )
    return out


def _check_keys(bn: BatchNorm, trace: dict[str, list[np.ndarray]]) -> None:
    needed = [f"{key}_{stat}" for key in ("batch", EMA_KEY, DEBIASED_KEY) for stat in STATS]
    missing = [key for key in needed if key not in trace]
    if missing:
        raise ValueError(f"the training history of layer {bn.name!r} lacks {', '.join(missing)}")
    if POPULATION_KEY not in bn.estimators or bn.estimators[POPULATION_KEY].mean is None:
        raise ValueError(
            f"layer {bn.name!r} has no population statistics; call net.recalibrate(X_train) first"
        )
