"""f) Shifted data: accuracy before and after adapting the BN statistics (Schneider et al.).

The digits test set (pixels in [0, 1]) is shifted by a contrast change around mid-grey and
additive Gaussian noise, at two severities, with no clipping::

    x_shifted = 0.5 + contrast * (x - 0.5) + noise * N(0, 1)

- torch CNN (``benchmarks.digits_training``, BN statistics as training left them, torch's
  EMA(0.1)): ``bt.adapt(model, shifted_test_batches, prior=N)`` with the unlabelled shifted
  test set in batches of n = 64, N = 0, 16, 256 (the library's own function);
- engine MLP (source statistics: its EMA(0.1) estimator): the same formula written here,
  the target statistics measured by ``Network.recalibrate`` on the shifted test inputs::

    mu  = N / (N + n) * mu_source  + n / (N + n) * mu_target    (same for var)

Recovery = (adapted - shifted) / (clean - shifted): the share of the accuracy lost to the
shift that adaptation wins back. Mean over the seeds.
"""

from __future__ import annotations

import copy
import statistics
from dataclasses import dataclass
from typing import Any

import numpy as np

from benchmarks.config import Config
from benchmarks.digits_training import (
    BATCH,
    digits,
    torch_accuracy,
    train_batches,
    train_cnn,
    train_engine,
)
from benchmarks.report import Goal, Result, Table

PRIORS = (0, 16, 256)
SHIFTS = {"mild": (0.5, 0.1), "severe": (0.5, 0.2)}  # name: (contrast, noise sd)
SOURCE = "EMA(0.1)"


def shift(X: np.ndarray, contrast: float, noise: float, seed: int) -> np.ndarray:
    """``0.5 + contrast * (X - 0.5) + noise * N(0, 1)``, the noise drawn with ``seed``."""
    rng = np.random.default_rng(1000 + seed)
    return 0.5 + contrast * (X - 0.5) + noise * rng.standard_normal(X.shape)


@dataclass
class FixedStatistics:
    """A test-time estimate the engine's BatchNorm can normalize with (``.mean``, ``.var``)."""

    mean: np.ndarray
    var: np.ndarray


def engine_adapt(net: Any, X_target: np.ndarray, prior: float, n: int = BATCH) -> Any:
    """A copy of ``net`` whose estimator ``"adapted"`` mixes ``SOURCE`` with the target."""
    work = copy.deepcopy(net)
    work.recalibrate(X_target, batch_size=n, name="target")
    w_source, w_target = prior / (prior + n), n / (prior + n)
    for layer in work.batchnorm_layers:
        source, target = layer.estimators[SOURCE], layer.estimators["target"]
        layer.estimators["adapted"] = FixedStatistics(
            w_source * source.mean + w_target * target.mean,
            w_source * source.var + w_target * target.var,
        )
    return work


def engine_seed(seed: int, epochs: int, contrast: float, noise: float) -> dict[str, float]:
    net, data = train_engine(seed, epochs), digits(seed)
    X = shift(data.X_test, contrast, noise, seed)
    out = {
        "clean": 100 * net.evaluate(data.X_test, data.y_test, stats=SOURCE),
        "shifted": 100 * net.evaluate(X, data.y_test, stats=SOURCE),
    }
    for prior in PRIORS:
        adapted = engine_adapt(net, X, prior)
        out[f"prior {prior}"] = 100 * adapted.evaluate(X, data.y_test, stats="adapted")
    return out


def cnn_seed(seed: int, epochs: int, contrast: float, noise: float) -> dict[str, float]:
    import bnstats.torch as bt

    model, data = train_cnn(seed, epochs).model, digits(seed)
    X = shift(data.X_test, contrast, noise, seed)
    out = {
        "clean": torch_accuracy(model, data.X_test, data.y_test),
        "shifted": torch_accuracy(model, X, data.y_test),
    }
    for prior in PRIORS:
        adapted = bt.adapt(copy.deepcopy(model), train_batches(X), prior=prior)
        out[f"prior {prior}"] = torch_accuracy(adapted, X, data.y_test)
    return out


def recovery(row: dict[str, float], key: str) -> float:
    lost = row["clean"] - row["shifted"]
    return (row[key] - row["shifted"]) / lost if lost > 0 else float("nan")


def summarize(per_seed: list[dict[str, float]]) -> dict[str, Any]:
    keys = list(per_seed[0])
    out: dict[str, Any] = {k: statistics.fmean(r[k] for r in per_seed) for k in keys}
    for prior in PRIORS:
        values = [recovery(r, f"prior {prior}") for r in per_seed]
        out[f"recovery prior {prior}"] = statistics.fmean(values)
        out[f"recovery prior {prior} range"] = [min(values), max(values)]
    return out


def run(config: Config) -> Result:
    runners = {"torch CNN (bt.adapt)": cnn_seed, "engine MLP (formula)": engine_seed}
    data: dict[str, Any] = {}
    table = Table(
        f"Test accuracy (%) clean, shifted, adapted (n = {BATCH}); recovery of the loss; "
        f"mean over {len(config.seeds)} seeds",
        [
            "model",
            "shift",
            "clean",
            "shifted",
            *(f"prior {p}" for p in PRIORS),
            *(f"recovery {p}" for p in PRIORS),
        ],
    )
    goals = []
    for model, runner in runners.items():
        for severity, (contrast, noise) in SHIFTS.items():
            rows = [runner(s, config.epochs, contrast, noise) for s in config.seeds]
            summary = summarize(rows)
            data[f"{model} / {severity}"] = {"per_seed": rows, **summary}
            table.add(
                model,
                f"{severity} (c={contrast}, sd={noise})",
                summary["clean"],
                summary["shifted"],
                *(summary[f"prior {p}"] for p in PRIORS),
                *(summary[f"recovery prior {p}"] for p in PRIORS),
            )
            goals.append(
                Goal(
                    f"{model}, {severity} shift: recovery with prior 16",
                    summary["recovery prior 16"],
                    0.5,
                    at_most=False,
                )
            )
    return Result(
        key="f",
        title="Shifted digits: accuracy before and after adapting BN statistics",
        settings={
            "shift": "0.5 + contrast * (x - 0.5) + sd * N(0, 1)",
            "severities": {k: {"contrast": c, "sd": s} for k, (c, s) in SHIFTS.items()},
            "seeds": list(config.seeds),
            "epochs": config.epochs,
        },
        data=data,
        tables=[table],
        goals=goals,
    )
