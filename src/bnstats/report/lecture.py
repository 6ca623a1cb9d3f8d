"""The numbers behind the lecture's picture: one layer's ``mu`` and ``var`` of every batch its
estimators took (one per training step, or with Ghost Batch Norm one per virtual batch), the
EMA and debiased EMA after each (replayed from those batches, so they are the estimators' own
numbers), and the population value.

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
from bnstats.functional import Moments
from bnstats.methods import DEBIASED_EMA, POPULATION, RUNNING_EMA
from bnstats.stats import Estimator

DEFAULT_UNIT_COUNT = 3
"""How many units the picture shows when none are chosen: the layer's first three."""

STATS = ("mean", "var")
EMA_KEY, POPULATION_KEY = RUNNING_EMA.name, POPULATION.name


@dataclass(frozen=True)
class LectureTrace:
    """One statistic (``"mean"`` or ``"var"``) of one layer, every unit, every update.

    ``batch``, ``ema`` and ``ema_debiased`` have shape (updates, units); ``batch`` row ``t`` is
    the value of the ``t``-th batch the estimators took (for ``var`` converted to unbiased),
    ``batch_size[t]`` its rows, and the estimates are those after it. ``population`` (units,)
    is the exact value over the training set with the final weights. ``units`` are the units
    chosen for the figure; ``momentum`` is the EMA's (weight of the newest batch). ``steps``
    counts the updates; ``training_steps`` the training steps, when fewer (each step cut into
    virtual batches).
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
    training_steps: int | None = None

    @property
    def steps(self) -> int:
        return len(self.batch)

    @property
    def virtual(self) -> bool:
        """Whether the estimators took several (virtual) batches per training step."""
        return self.training_steps is not None and self.training_steps != self.steps

    @property
    def features(self) -> int:
        return self.batch.shape[1]


def typical_batch_size(batch_size: np.ndarray) -> int:
    """The full batch size of a run, its largest: the others are shorter last batches."""
    return int(np.max(batch_size))


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
    momentum = float(bn.estimators[EMA_KEY].momentum)
    seen = history.moments_seen(bn.name)
    sizes = np.asarray([count for _, _, count in seen])
    ema = replayed(RUNNING_EMA.estimator(momentum), seen)
    debiased = replayed(DEBIASED_EMA.estimator(momentum), seen)
    out = {}
    for stat in STATS:
        batch = np.stack(trace[f"batch_{stat}"]).astype(np.float64)
        if stat == "var":
            batch = unbiased_batch_var(batch, sizes)
        out[stat] = LectureTrace(
            layer=bn.name,
            stat=stat,
            units=chosen,
            momentum=momentum,
            batch_size=sizes,
            batch=batch,
            ema=ema[stat],
            ema_debiased=debiased[stat],
            population=np.asarray(getattr(bn.estimators[POPULATION_KEY], stat), np.float64),
            training_steps=history.steps,
        )
    return out


def replayed(estimator: Estimator, seen: Sequence[Moments]) -> dict[str, np.ndarray]:
    """``{"mean": ..., "var": ...}`` of ``estimator`` after each of the batches ``seen`` (shape
    (updates, features)), fed in order as in training."""
    means, variances = [], []
    for mu, var, count in seen:
        estimator.update(mu, var, count)
        means.append(np.array(estimator.mean, dtype=np.float64))
        variances.append(np.array(estimator.var, dtype=np.float64))
    return {"mean": np.stack(means), "var": np.stack(variances)}


def _check_keys(bn: BatchNorm, trace: dict[str, list[np.ndarray]]) -> None:
    missing = [f"batch_{stat}" for stat in STATS if f"batch_{stat}" not in trace]
    if missing:
        raise ValueError(f"the training history of layer {bn.name!r} lacks {', '.join(missing)}")
    if EMA_KEY not in bn.estimators:
        raise ValueError(f"layer {bn.name!r} has no estimator {EMA_KEY!r} to take momentum from")
    if POPULATION_KEY not in bn.estimators or bn.estimators[POPULATION_KEY].mean is None:
        raise ValueError(
            f"layer {bn.name!r} has no population statistics; call net.recalibrate(X_train) first"
        )
