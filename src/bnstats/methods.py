"""The demo's test-time methods: each way of getting the ``mu`` and ``var`` a test batch is
normalized with, its label, how it is built and its colour, for the demo, the report and the
command line alike.

- ``batch``: the test batch's own statistics, at a fixed test batch size (``None``: the whole
  test set as one batch);
- ``running``: an estimator fed by every training batch, built from the run's ``momentum``;
- ``recalibrated``: the exact population statistics, recomputed after training with the
  weights frozen (:meth:`bnstats.engine.Network.recalibrate`), each layer's input measured
  as in training (``population``: every BatchNorm before it on the batch's statistics) or as
  at inference (``population (eval)``: every BatchNorm before it on its own population
  statistics).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from bnstats.stats import EMA, CumulativeAverage, Estimator

Source = Literal["batch", "running", "recalibrated"]


@dataclass(frozen=True)
class Method:
    """One test-time method. ``name`` keys accuracies and, for ``running`` and
    ``recalibrated`` methods, the estimator in each BatchNorm layer; ``estimator`` builds a
    ``running`` one from the momentum; ``batch_size`` is a ``batch`` method's test batch;
    ``mode`` is a ``recalibrated`` method's :meth:`~bnstats.engine.Network.recalibrate` mode."""

    name: str
    label: str
    description: str
    color: str
    source: Source
    estimator: Callable[[float], Estimator] | None = None
    batch_size: int | None = None
    mode: Literal["train", "eval"] = "train"


BATCH_COLOR = "#8c8c8c"

RUNNING_EMA = Method(
    "ema",
    "EMA",
    "running average, momentum weighting the newest batch",
    "#1f77b4",
    "running",
    estimator=EMA,
)
DEBIASED_EMA = Method(
    "ema_debiased",
    "debiased EMA",
    "running average divided by 1 - (1 - momentum)^t",
    "#ff7f0e",
    "running",
    estimator=lambda momentum: EMA(momentum, debias=True),
)
CUMULATIVE = Method(
    "cumulative",
    "cumulative average",
    "every training batch weighted equally",
    "#2ca02c",
    "running",
    estimator=lambda _: CumulativeAverage(),
)
POPULATION = Method(
    "population",
    "population",
    "exact statistics of the training set, weights frozen",
    "#d62728",
    "recalibrated",
)
POPULATION_EVAL = Method(
    "population_eval",
    "population (eval)",
    "exact statistics of the training set as inference sees them, weights frozen",
    "#9467bd",
    "recalibrated",
    mode="eval",
)

METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method(
            "batch@1",
            "batch@1",
            "each test row normalized by itself",
            BATCH_COLOR,
            "batch",
            batch_size=1,
        ),
        Method(
            "batch@8",
            "batch@8",
            "test batches of 8 normalized by their own statistics",
            BATCH_COLOR,
            "batch",
            batch_size=8,
        ),
        Method(
            "batch@all",
            "batch@all",
            "the whole test set normalized by its own statistics",
            BATCH_COLOR,
            "batch",
        ),
        RUNNING_EMA,
        DEBIASED_EMA,
        CUMULATIVE,
        POPULATION_EVAL,
        POPULATION,
    )
}
"""Every method by name, in the order tables and figures list them."""

ESTIMATE_METHODS = tuple(name for name, m in METHODS.items() if m.source != "batch")
"""The names of the methods that normalize with a fixed estimate."""


def running_estimators(momentum: float) -> dict[str, Estimator]:
    """A fresh estimator of every ``running`` method, by name."""
    return {name: m.estimator(momentum) for name, m in METHODS.items() if m.estimator is not None}


__all__ = [
    "CUMULATIVE",
    "DEBIASED_EMA",
    "ESTIMATE_METHODS",
    "METHODS",
    "POPULATION",
    "POPULATION_EVAL",
    "RUNNING_EMA",
    "Method",
    "running_estimators",
]
