"""The demo: train the engine's MLP with every running estimator of
:data:`bnstats.methods.METHODS` side by side, recalibrate the population statistics, and
measure test accuracy with each method. ``norm`` picks batch norm, Batch Renorm (its schedule
fitted to the run) or Ghost Batch Norm. Bad settings raise ``ValueError`` naming the
command-line option. ``bnstats demo`` (:mod:`bnstats.cli.demo`) runs it; :mod:`bnstats.report`
draws the result.
"""

from __future__ import annotations

from collections.abc import Sequence
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
from bnstats.methods import (
    DEBIASED_EMA,
    METHODS,
    POPULATION,
    POPULATION_EVAL,
    RUNNING_EMA,
    Method,
    running_estimators,
)
from bnstats.renorm import RenormSchedule

NORM_LABELS = {"bn": "batch norm", "renorm": "Batch Renorm", "ghost": "Ghost Batch Norm"}
"""The normalization layers ``--norm`` chooses from, in words."""

DEFAULT_GHOST_SIZE = 16


@dataclass
class DemoConfig:
    """The demo's settings; the defaults are ``bnstats demo``'s. ``ghost_size`` applies to
    ``norm="ghost"`` only (default :data:`DEFAULT_GHOST_SIZE`); ``report_layer`` names the
    BatchNorm layer the report draws (default: the first), checked before training."""

    data: str = "digits"
    epochs: int = 20
    batch_size: int = 64
    momentum: float = 0.1
    lr: float = 1e-3
    seed: int = 0
    hidden: tuple[int, ...] = (128, 64)
    test_fraction: float = 0.25
    norm: str = "bn"
    ghost_size: int | None = None
    report_layer: str | None = None

    def drop_last(self, rows: int) -> bool:
        """Drop a last batch of one row (batch norm cannot train on it)."""
        return rows % self.batch_size == 1

    def steps(self, rows: int) -> int:
        """Training steps over ``rows`` rows: epochs times batches per epoch."""
        return self.epochs * len(batch_slices(rows, self.batch_size, self.drop_last(rows)))

    @property
    def virtual_batch(self) -> int:
        """Rows per virtual batch with ``norm="ghost"``."""
        return DEFAULT_GHOST_SIZE if self.ghost_size is None else self.ghost_size

    def renorm_schedule(self, rows: int) -> RenormSchedule:
        """The paper's schedule fitted to this run: its ramps end half-way through training."""
        return RenormSchedule().scaled_to(self.steps(rows))

    def norm_factory(self, rows: int) -> NormFactory:
        """The normalization layer ``norm`` names, for a run over ``rows`` training rows."""
        if self.norm == "renorm":
            return partial(BatchRenorm, schedule=self.renorm_schedule(rows))
        if self.norm == "ghost":
            return partial(GhostBatchNorm, ghost_size=self.virtual_batch)
        return BatchNorm


@dataclass
class DemoResult:
    """A finished run: its settings, data, trained network, history and test accuracy per
    method of :data:`bnstats.methods.METHODS`."""

    config: DemoConfig
    dataset: Dataset
    net: Network
    history: History
    test_accuracy: dict[str, float] = field(default_factory=dict)

    @property
    def chance_level(self) -> float:
        """:func:`chance_level` of the run's test set."""
        return chance_level(self.dataset)

    def accuracy_by_batch_size(self, sizes: tuple[int, ...]) -> dict[int, float]:
        """:func:`accuracy_by_batch_size` of the trained network; the sizes that
        :attr:`test_accuracy` already holds (``batch@1``, ``batch@8``) are taken from there,
        where the same evaluation put them."""
        known = {
            m.batch_size: self.test_accuracy[name]
            for name, m in METHODS.items()
            if m.source == "batch" and m.batch_size is not None and name in self.test_accuracy
        }
        measured = accuracy_by_batch_size(
            self.net, self.dataset, tuple(s for s in sizes if s not in known)
        )
        return {s: known[s] if s in known else measured[s] for s in sizes}

    def accuracy_by_momentum(self, momenta: Sequence[float]) -> dict[str, list[float]]:
        """Test accuracy with an EMA and a debiased EMA of each of ``momenta``, by method name:
        each fed, in every BatchNorm layer, the batches the layer's estimators took, so they
        end where estimators trained alongside them would (see :func:`accuracy_replayed`)."""
        seen = {bn.name: self.history.stacked_moments(bn.name) for bn in self.net.batchnorm_layers}
        return {
            m.name: [_accuracy_replayed(self.net, seen, self.dataset, m, x) for x in momenta]
            for m in (RUNNING_EMA, DEBIASED_EMA)
        }

    @property
    def architecture(self) -> str:
        """``64-128-64-10``: inputs, hidden widths, classes."""
        data = self.dataset
        return "-".join(str(n) for n in (data.features, *self.config.hidden, data.classes))

    @property
    def norm_description(self) -> str:
        """The normalization layers in words, e.g. ``Ghost Batch Norm (virtual batches of 16)``."""
        label = NORM_LABELS[self.config.norm]
        layer = self.net.batchnorm_layers[0]
        if isinstance(layer, GhostBatchNorm):
            return f"{label} (virtual batches of {layer.ghost_size})"
        if isinstance(layer, BatchRenorm):
            s = layer.schedule
            return (
                f"{label} (plain for {s.warmup_steps} steps, rmax {s.rmax:g} by step "
                f"{s.rmax_full_at}, dmax {s.dmax:g} by step {s.dmax_full_at})"
            )
        return label

    def layers(self) -> list[dict[str, Any]]:
        """Each BatchNorm's running (EMA) and population statistics (as measured in training
        mode and, ``population_eval_*``, as inference sees them)."""
        ema, population, inference = RUNNING_EMA.name, POPULATION.name, POPULATION_EVAL.name
        return [
            {
                "name": layer.name,
                "features": layer.num_features,
                "running_mean": layer.estimators[ema].mean.tolist(),
                "running_var": layer.estimators[ema].var.tolist(),
                "population_mean": layer.estimators[population].mean.tolist(),
                "population_var": layer.estimators[population].var.tolist(),
                "population_eval_mean": layer.estimators[inference].mean.tolist(),
                "population_eval_var": layer.estimators[inference].var.tolist(),
            }
            for layer in self.net.batchnorm_layers
        ]

    def to_dict(self) -> dict[str, Any]:
        """The JSON object ``bnstats demo --json`` prints."""
        norm: dict[str, Any] = {"norm": self.config.norm}
        layer = self.net.batchnorm_layers[0]
        if isinstance(layer, GhostBatchNorm):
            norm["ghost_size"] = layer.ghost_size
        if isinstance(layer, BatchRenorm):
            norm["renorm_schedule"] = layer.schedule.to_dict()
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
            "chance_level": self.chance_level,
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
    _check_norm(config)
    rows = len(dataset.X_train)
    if rows < config.batch_size:
        raise ValueError(
            f"{dataset.name}: {rows} training rows are too few for --batch-size {config.batch_size}"
        )


def _check_norm(config: DemoConfig) -> None:
    if config.norm not in NORM_LABELS:
        raise ValueError(f"--norm must be one of {', '.join(NORM_LABELS)}, got {config.norm!r}")
    if config.ghost_size is not None and config.norm != "ghost":
        raise ValueError(f"--ghost-size applies to --norm ghost only, not --norm {config.norm}")
    if config.norm == "ghost" and not 2 <= config.virtual_batch <= config.batch_size:
        given = "" if config.ghost_size is not None else " (the default)"
        raise ValueError(
            f"--ghost-size must lie between 2 and --batch-size {config.batch_size}, "
            f"got {config.virtual_batch}{given}"
        )


def build_network(config: DemoConfig, features: int, classes: int, rows: int) -> Network:
    """The demo's MLP for ``features`` inputs and ``classes`` outputs, trained on ``rows`` rows
    (which fixes the step count Batch Renorm's schedule is fitted to)."""
    return Network.mlp(
        [features, *config.hidden, classes],
        seed=config.seed,
        estimators=running_estimators(config.momentum),
        norm=config.norm_factory(rows),
    )


def prepare_demo(config: DemoConfig, dataset: Dataset | None = None) -> tuple[Dataset, Network]:
    """The run's dataset (``dataset`` if given, else the one ``config.data`` names) and its
    untrained network, every setting checked: a bad one raises ``ValueError`` before anything
    is trained."""
    if dataset is None:
        dataset = load_dataset(config.data, seed=config.seed, test_fraction=config.test_fraction)
    check_config(config, dataset)
    net = build_network(config, dataset.features, dataset.classes, len(dataset.X_train))
    if config.report_layer is not None:
        net.batchnorm_layer(config.report_layer)
    return dataset, net


def run_demo(
    config: DemoConfig,
    progress: ProgressCallback | None = None,
    dataset: Dataset | None = None,
) -> DemoResult:
    """:func:`prepare_demo`, then :func:`train_demo`."""
    return train_demo(config, *prepare_demo(config, dataset), progress=progress)


def train_demo(
    config: DemoConfig, dataset: Dataset, net: Network, progress: ProgressCallback | None = None
) -> DemoResult:
    """Train ``net``, recalibrate it, and measure test accuracy with every method of
    :data:`~bnstats.methods.METHODS`, with one BLAS thread."""
    rows = len(dataset.X_train)
    with one_blas_thread():
        history = net.fit(
            dataset.X_train,
            dataset.y_train,
            epochs=config.epochs,
            batch_size=config.batch_size,
            optimizer=Adam(config.lr),
            seed=config.seed,
            drop_last=config.drop_last(rows),
            progress=progress,
        )
        for method in METHODS.values():
            if method.source == "recalibrated":
                net.recalibrate(
                    dataset.X_train,
                    batch_size=config.batch_size,
                    name=method.name,
                    mode=method.mode,
                )
        accuracy = accuracy_per_method(net, dataset)
    return DemoResult(config, dataset, net, history, accuracy)


def accuracy_per_method(net: Network, dataset: Dataset) -> dict[str, float]:
    """Test accuracy per method: the batch's own statistics at several sizes, each estimate."""
    X, y = dataset.X_test, dataset.y_test
    return {
        name: net.evaluate(X, y, stats=BATCH, batch_size=m.batch_size)
        if m.source == "batch"
        else net.evaluate(X, y, stats=name)
        for name, m in METHODS.items()
    }


def accuracy_replayed(
    net: Network, history: History, dataset: Dataset, method: Method, momentum: float
) -> float:
    """Test accuracy with ``method``'s estimator at ``momentum`` in every BatchNorm layer, fed
    the batches that layer's estimators took in training (:meth:`History.moments_seen`). The
    network's estimators are left as they were."""
    seen = {bn.name: history.stacked_moments(bn.name) for bn in net.batchnorm_layers}
    return _accuracy_replayed(net, seen, dataset, method, momentum)


def _accuracy_replayed(
    net: Network,
    seen: dict[str, tuple[list[int], np.ndarray, np.ndarray]],
    dataset: Dataset,
    method: Method,
    momentum: float,
) -> float:
    """:func:`accuracy_replayed` with each layer's batches given, as
    :meth:`History.stacked_moments` gives them, by layer name."""
    key = f"{method.name}@{momentum!r}"
    try:
        for layer in net.batchnorm_layers:
            estimator = method.estimator(momentum)
            estimator.update_sequence(*seen[layer.name])
            layer.estimators[key] = estimator
        return net.evaluate(dataset.X_test, dataset.y_test, stats=key)
    finally:
        for layer in net.batchnorm_layers:
            layer.estimators.pop(key, None)


def accuracy_by_batch_size(
    net: Network, dataset: Dataset, sizes: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128)
) -> dict[int, float]:
    """Test accuracy with the test batch's own statistics, per test batch size."""
    X, y = dataset.X_test, dataset.y_test
    return {size: net.evaluate(X, y, stats=BATCH, batch_size=size) for size in sizes}


def chance_level(dataset: Dataset) -> float:
    """Accuracy of always answering the most common test label."""
    return float(np.bincount(dataset.y_test).max() / len(dataset.y_test))
