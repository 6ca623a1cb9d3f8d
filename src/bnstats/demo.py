"""The demo: one training run of the NumPy engine, every way of getting test-time statistics.

A batch-normalized MLP is trained from scratch; each BatchNorm layer carries an EMA, a
bias-corrected EMA and a cumulative average side by side, all fed by the same batches.
After training the exact population statistics are recomputed with the weights frozen.
Then the test set is classified with each estimate, and with the test batch's own
statistics at batch sizes 1, 8 and the whole set, for contrast.

``norm`` swaps the batch-norm layers for Batch Renormalization (its schedule fitted to the
run, :meth:`~bnstats.renorm.RenormSchedule.scaled_to`) or Ghost Batch Norm (virtual batches of
``ghost_size`` rows).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from bnstats._threads import one_blas_thread
from bnstats.data import Dataset, load_dataset
from bnstats.engine import BATCH, Adam, BatchNorm, BatchRenorm, GhostBatchNorm, History, Network
from bnstats.engine.network import NormFactory
from bnstats.engine.training import ProgressCallback, batch_slices
from bnstats.renorm import RenormSchedule
from bnstats.stats import EMA, CumulativeAverage

ESTIMATE_METHODS = ("ema", "ema_debiased", "cumulative", "population")
BATCH_METHODS = {"batch@1": 1, "batch@8": 8, "batch@all": None}
METHODS = (*BATCH_METHODS, *ESTIMATE_METHODS)

DESCRIPTIONS = {
    "batch@1": "each test row normalized by itself",
    "batch@8": "test batches of 8 normalized by their own statistics",
    "batch@all": "the whole test set normalized by its own statistics",
    "ema": "running average, momentum weighting the newest batch",
    "ema_debiased": "running average divided by 1 - (1 - momentum)^t",
    "cumulative": "every training batch weighted equally",
    "population": "exact statistics of the training set, weights frozen",
}

NORM_LABELS = {"bn": "batch norm", "renorm": "Batch Renorm", "ghost": "Ghost Batch Norm"}


@dataclass
class DemoConfig:
    """The demo's settings; the defaults are ``bnstats demo``'s."""

    data: str = "digits"
    epochs: int = 20
    batch_size: int = 64
    momentum: float = 0.1
    lr: float = 1e-3
    seed: int = 0
    hidden: tuple[int, ...] = (128, 64)
    test_fraction: float = 0.25
    norm: str = "bn"
    ghost_size: int = 16

    def drop_last(self, rows: int) -> bool:
        """Drop a last batch of one row (batch norm cannot train on it)."""
        return rows % self.batch_size == 1

    def steps(self, rows: int) -> int:
        """Training steps over ``rows`` rows: epochs times batches per epoch."""
        return self.epochs * len(batch_slices(rows, self.batch_size, self.drop_last(rows)))

    def renorm_schedule(self, rows: int) -> RenormSchedule:
        """The paper's schedule fitted to this run: its ramps end half-way through training."""
        return RenormSchedule().scaled_to(self.steps(rows))

    def norm_factory(self, rows: int) -> NormFactory:
        """The normalization layer ``norm`` names, for a run over ``rows`` training rows."""
        if self.norm == "renorm":
            return partial(BatchRenorm, schedule=self.renorm_schedule(rows))
        if self.norm == "ghost":
            return partial(GhostBatchNorm, ghost_size=self.ghost_size)
        return BatchNorm


@dataclass
class DemoResult:
    config: DemoConfig
    dataset: Dataset
    net: Network
    history: History
    test_accuracy: dict[str, float] = field(default_factory=dict)

    def layers(self) -> list[dict[str, Any]]:
        """Each BatchNorm's running (EMA) and population statistics."""
        return [
            {
                "name": layer.name,
                "features": layer.num_features,
                "running_mean": layer.estimators["ema"].mean.tolist(),
                "running_var": layer.estimators["ema"].var.tolist(),
                "population_mean": layer.estimators["population"].mean.tolist(),
                "population_var": layer.estimators["population"].var.tolist(),
            }
            for layer in self.net.batchnorm_layers
        ]

    def to_dict(self) -> dict[str, Any]:
        """The JSON object ``bnstats demo --json`` prints."""
        norm: dict[str, Any] = {"norm": self.config.norm}
        if self.config.norm == "ghost":
            norm["ghost_size"] = self.config.ghost_size
        if self.config.norm == "renorm":
            norm["renorm_schedule"] = self.net.batchnorm_layers[0].schedule.to_dict()
        return {
            "dataset": self.dataset.name,
            "train_rows": len(self.dataset.X_train),
            "test_rows": len(self.dataset.X_test),
            "epochs": self.config.epochs,
            "batch_size": self.config.batch_size,
            "momentum": self.config.momentum,
            "lr": self.config.lr,
            "seed": self.config.seed,
            "hidden": list(self.config.hidden),
            **norm,
            "steps": self.history.steps,
            "test_accuracy": dict(self.test_accuracy),
            "layers": self.layers(),
        }

    def save(self, directory: str | Path) -> Path:
        """Write ``history.npz``, ``summary.json`` and ``network.npz`` into ``directory``."""
        directory = Path(directory)
        summary = self.to_dict()
        summary["config"] = {**asdict(self.config), "hidden": list(self.config.hidden)}
        self.history.save(directory, summary=summary)
        self.net.save(directory / "network.npz")
        return directory


def check_config(config: DemoConfig, dataset: Dataset) -> None:
    """Refuse settings that cannot work, before anything is trained."""
    if config.epochs < 1:
        raise ValueError(f"--epochs must be at least 1, got {config.epochs}")
    if config.batch_size < 2:
        raise ValueError(f"--batch-size must be at least 2 for batch norm, got {config.batch_size}")
    if not 0.0 < config.momentum <= 1.0:
        raise ValueError(f"--momentum must lie in (0, 1], got {config.momentum}")
    if not config.lr > 0:
        raise ValueError(f"--lr must be positive, got {config.lr}")
    if not config.hidden or any(h < 1 for h in config.hidden):
        raise ValueError(f"--hidden needs positive layer widths, got {config.hidden}")
    if config.norm not in NORM_LABELS:
        raise ValueError(f"--norm must be one of {', '.join(NORM_LABELS)}, got {config.norm!r}")
    if config.norm == "ghost" and not 2 <= config.ghost_size <= config.batch_size:
        raise ValueError(
            f"--ghost-size must lie between 2 and --batch-size {config.batch_size}, "
            f"got {config.ghost_size}"
        )
    rows = len(dataset.X_train)
    if rows < config.batch_size:
        raise ValueError(
            f"{dataset.name}: {rows} training rows are too few for --batch-size {config.batch_size}"
        )


def build_network(config: DemoConfig, features: int, classes: int, rows: int) -> Network:
    """The demo's MLP for ``features`` inputs and ``classes`` outputs, trained on ``rows`` rows
    (which fixes the step count Batch Renorm's schedule is fitted to)."""
    estimators = {
        "ema": EMA(config.momentum),
        "ema_debiased": EMA(config.momentum, debias=True),
        "cumulative": CumulativeAverage(),
    }
    sizes = [features, *config.hidden, classes]
    return Network.mlp(
        sizes, seed=config.seed, estimators=estimators, norm=config.norm_factory(rows)
    )


def load_demo_data(config: DemoConfig) -> Dataset:
    """The dataset ``config.data`` names, checked against the other settings."""
    dataset = load_dataset(config.data, seed=config.seed, test_fraction=config.test_fraction)
    check_config(config, dataset)
    return dataset


def run_demo(
    config: DemoConfig,
    progress: ProgressCallback | None = None,
    dataset: Dataset | None = None,
) -> DemoResult:
    """Train, recalibrate, and measure test accuracy with every method of :data:`METHODS`
    (on ``dataset`` if given, else the one ``config.data`` names), with one BLAS thread."""
    with one_blas_thread():
        return _run_demo(config, progress, dataset)


def _run_demo(
    config: DemoConfig, progress: ProgressCallback | None, dataset: Dataset | None
) -> DemoResult:
    if dataset is None:
        dataset = load_demo_data(config)
    else:
        check_config(config, dataset)
    rows = len(dataset.X_train)
    net = build_network(config, dataset.features, dataset.classes, rows)
    drop_last = config.drop_last(rows)
    history = net.fit(
        dataset.X_train,
        dataset.y_train,
        epochs=config.epochs,
        batch_size=config.batch_size,
        optimizer=Adam(config.lr),
        seed=config.seed,
        drop_last=drop_last,
        progress=progress,
    )
    net.recalibrate(dataset.X_train, batch_size=config.batch_size)
    result = DemoResult(config, dataset, net, history)
    result.test_accuracy = accuracy_per_method(net, dataset)
    return result


def accuracy_per_method(net: Network, dataset: Dataset) -> dict[str, float]:
    """Test accuracy per method: the batch's own statistics at several sizes, each estimate."""
    X, y = dataset.X_test, dataset.y_test
    accuracy = {
        name: net.evaluate(X, y, stats=BATCH, batch_size=size)
        for name, size in BATCH_METHODS.items()
    }
    for name in ESTIMATE_METHODS:
        accuracy[name] = net.evaluate(X, y, stats=name)
    return accuracy


def accuracy_by_batch_size(
    net: Network, dataset: Dataset, sizes: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128)
) -> dict[int, float]:
    """Test accuracy with the test batch's own statistics, per test batch size."""
    X, y = dataset.X_test, dataset.y_test
    return {size: net.evaluate(X, y, stats=BATCH, batch_size=size) for size in sizes}


def chance_level(dataset: Dataset) -> float:
    """Accuracy of always answering the most common test label."""
    return float(np.bincount(dataset.y_test).max() / len(dataset.y_test))
