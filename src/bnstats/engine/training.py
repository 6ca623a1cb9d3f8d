"""The mini-batch training loop, and the history of per-batch statistics it records.

For every BatchNorm layer and every step the history keeps the batch's own ``mu`` and
``var`` (biased, what the batch was normalized with) and each estimator's ``mean``/``var``
after the update: the lecture's picture of the running average tracing the batch values.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from bnstats._files import atomic_write_bytes, npz_bytes
from bnstats._formats import (
    FileFormatError,
    check_header,
    format_header,
    parse_header,
    read_npz,
)
from bnstats.engine.layers import BatchNorm
from bnstats.engine.optim import Adam, Optimizer
from bnstats.functional import Moments


class Trainable(Protocol):
    """What training uses of :class:`bnstats.engine.Network`."""

    @property
    def batchnorm_layers(self) -> list[BatchNorm]: ...

    def train_step(self, x: np.ndarray, y: np.ndarray, optimizer: Optimizer) -> float: ...


COUNT_PREFIX = "batch_count/"
"""``history.npz`` keys of :attr:`History.batch_count`, beside the ``<layer>/<key>`` arrays."""

ProgressCallback = Callable[[int, int, float], None]
"""Called after each step with ``(step, total_steps, loss)``."""


@dataclass
class History:
    """What training did, step by step.

    ``loss[k]`` and ``batch_size[k]`` are step k's; ``epoch_loss[e]`` the mean over epoch e;
    ``layers[name][key]`` is a list with one vector per step for keys ``<estimator>_mean`` /
    ``<estimator>_var``, and one per estimator update for ``batch_mean`` and ``batch_var``, with
    ``batch_count[name]`` the values per channel behind each: what the estimators took (one
    update per step, or with Ghost Batch Norm one per virtual batch).
    """

    loss: list[float] = field(default_factory=list)
    batch_size: list[int] = field(default_factory=list)
    epoch_loss: list[float] = field(default_factory=list)
    layers: dict[str, dict[str, list[np.ndarray]]] = field(default_factory=dict)
    batch_count: dict[str, list[int]] = field(default_factory=dict)

    @property
    def steps(self) -> int:
        return len(self.loss)

    def record(self, net: Trainable, loss: float, batch_size: int) -> None:
        self.loss.append(loss)
        self.batch_size.append(batch_size)
        for layer in net.batchnorm_layers:
            trace = self.layers.setdefault(layer.name, {})
            for mu, var, count in layer.last_moments:
                trace.setdefault("batch_mean", []).append(mu.copy())
                trace.setdefault("batch_var", []).append(var.copy())
                self.batch_count.setdefault(layer.name, []).append(count)
            for key, est in layer.estimators.items():
                trace.setdefault(f"{key}_mean", []).append(np.array(est.mean, copy=True))
                trace.setdefault(f"{key}_var", []).append(np.array(est.var, copy=True))

    def moments_seen(self, layer: str) -> list[Moments]:
        """The ``(mu, var, count)`` that layer ``layer``'s estimators took, update by update: fed
        in this order, a new estimator ends where one trained alongside them would."""
        trace = self.layers[layer]
        counts = self.batch_count.get(layer, self.batch_size)  # files without batch_count
        return list(zip(trace["batch_mean"], trace["batch_var"], counts, strict=True))

    def stacked_moments(self, layer: str) -> tuple[list[int], np.ndarray, np.ndarray]:
        """:meth:`moments_seen` as ``(counts, means, variances)``, the arrays of shape
        (updates, features): what :meth:`~bnstats.stats.Estimator.update_sequence` takes."""
        seen = self.moments_seen(layer)
        if not seen:
            raise ValueError(f"the training history holds no batch of layer {layer!r}")
        means, variances, counts = zip(*seen, strict=True)
        return list(counts), np.stack(means), np.stack(variances)

    def arrays(self) -> dict[str, np.ndarray]:
        """Flat arrays: ``loss``, ``batch_size``, ``epoch_loss`` and ``<layer>/<key>`` of shape
        (steps, features)."""
        out = {
            "loss": np.asarray(self.loss),
            "batch_size": np.asarray(self.batch_size),
            "epoch_loss": np.asarray(self.epoch_loss),
        }
        for name, trace in self.layers.items():
            for key, values in trace.items():
                out[f"{name}/{key}"] = np.stack(values)
        for name, counts in self.batch_count.items():
            out[f"{COUNT_PREFIX}{name}"] = np.asarray(counts)
        return out

    def save(self, directory: str | Path, summary: dict[str, Any] | None = None) -> Path:
        """Write ``history.npz`` (the arrays) and ``summary.json`` into ``directory``, each
        with its format name and version (:data:`HISTORY_FORMAT`, :data:`SUMMARY_FORMAT`)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        header = np.array(json.dumps(format_header(HISTORY_FORMAT, FORMAT_VERSION)))
        arrays = {FORMAT_KEY: header, **self.arrays()}
        atomic_write_bytes(directory / "history.npz", npz_bytes(arrays))
        info = {
            "steps": self.steps,
            "epochs": len(self.epoch_loss),
            "layers": {name: sorted(trace) for name, trace in self.layers.items()},
            **(summary or {}),
            **format_header(SUMMARY_FORMAT, FORMAT_VERSION),
        }
        text = json.dumps(info, indent=2)
        atomic_write_bytes(directory / "summary.json", text.encode())
        return directory

    @classmethod
    def load(cls, path: str | Path) -> History:
        """Read the ``history.npz`` written by :meth:`save`; a foreign, damaged or
        inconsistent file raises :class:`~bnstats._formats.FileFormatError` naming it."""
        path = Path(path)
        arrays = read_npz(path, "a bnstats history file (history.npz, from History.save)")
        if FORMAT_KEY not in arrays:
            raise FileFormatError(f"{path} is not a bnstats history file (no {FORMAT_KEY})")
        header = parse_header(str(arrays.pop(FORMAT_KEY)), path)
        check_header(header, path, HISTORY_FORMAT, FORMAT_VERSION)
        _check_history_arrays(arrays, path)
        history = cls(
            loss=arrays["loss"].tolist(),
            batch_size=arrays["batch_size"].tolist(),
            epoch_loss=arrays["epoch_loss"].tolist(),
        )
        for key, values in arrays.items():
            if key.startswith(COUNT_PREFIX):
                history.batch_count[key[len(COUNT_PREFIX) :]] = values.tolist()
            elif "/" in key:
                name, stat = key.split("/", 1)
                history.layers.setdefault(name, {})[stat] = list(values)
        return history

    @staticmethod
    def load_summary(path: str | Path) -> dict[str, Any]:
        """Read the ``summary.json`` written by :meth:`save`, its format checked."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise FileFormatError(f"{path}: not a UTF-8 text file ({err})") from None
        summary = check_header(parse_header(text, path), path, SUMMARY_FORMAT, FORMAT_VERSION)
        if type(summary.get("steps")) is not int:
            raise FileFormatError(f"{path}: damaged summary (no number of steps)")
        return summary


HISTORY_FORMAT = "bnstats.engine.History"
SUMMARY_FORMAT = "bnstats.engine.History.summary"
FORMAT_VERSION = 1
FORMAT_KEY = "__format__"
HISTORY_KEYS = ("loss", "batch_size", "epoch_loss")


def _check_history_arrays(arrays: dict[str, np.ndarray], path: Path) -> None:
    """Every array present, numeric and of the shape :meth:`History.arrays` gives: one row
    per step (one width per layer), ``epoch_loss`` one value per epoch."""
    missing = [key for key in HISTORY_KEYS if key not in arrays]
    if missing:
        raise FileFormatError(f"{path}: damaged history, missing arrays {missing}")
    steps = len(arrays["loss"])
    widths: dict[str, int] = {}
    for key, value in arrays.items():
        if value.dtype.kind not in "iuf":
            raise FileFormatError(f"{path}: {key} holds {value.dtype}, not real numbers")
        expected = _expected_shape(key, value, arrays, steps, widths)
        if expected is not None:
            raise FileFormatError(f"{path}: {key} has shape {value.shape}, expected {expected}")


def _expected_shape(
    key: str,
    value: np.ndarray,
    arrays: dict[str, np.ndarray],
    steps: int,
    widths: dict[str, int],
) -> str | None:
    """None if ``value`` fits ``key``, else the shape it should have: a layer's
    ``batch_mean``/``batch_var`` hold one row per update its estimators took
    (``batch_count/<layer>`` long, several per step with Ghost Batch Norm), its estimators'
    ``<estimator>_mean``/``_var`` one row per step."""
    if key in ("loss", "batch_size"):
        return None if value.shape == (steps,) else f"({steps},)"
    if key == "epoch_loss" or key.startswith(COUNT_PREFIX):
        return None if value.ndim == 1 else "(n,)"
    if "/" not in key:
        return "none: it is not a history array"
    layer, stat = key.split("/", 1)
    counts = arrays.get(COUNT_PREFIX + layer)
    per_update = stat in ("batch_mean", "batch_var") and counts is not None
    rows = len(counts) if per_update else steps
    width = widths.setdefault(layer, value.shape[-1] if value.ndim else -1)
    return None if value.shape == (rows, width) else f"({rows}, {width})"


def batch_slices(n: int, batch_size: int, drop_last: bool) -> list[slice]:
    """Consecutive slices of ``batch_size`` rows; the last one shorter unless dropped."""
    stops = range(batch_size, n + batch_size, batch_size)
    slices = [slice(stop - batch_size, min(stop, n)) for stop in stops]
    if drop_last and slices and slices[-1].stop - slices[-1].start < batch_size:
        slices.pop()
    return slices


def fit(
    net: Trainable,
    X: np.ndarray,
    y: np.ndarray,
    *,
    epochs: int = 20,
    batch_size: int = 64,
    optimizer: Optimizer | None = None,
    seed: int = 0,
    shuffle: bool = True,
    drop_last: bool = False,
    record: bool = True,
    progress: ProgressCallback | None = None,
) -> History:
    """Train ``net`` on ``(X, y)`` in shuffled mini-batches for ``epochs`` passes.

    Each step: forward with batch statistics (every BatchNorm feeds its estimators), softmax
    cross-entropy, backward, ``optimizer.step`` (default ``Adam(1e-3)``). Refuses up front,
    before any weight moves, a split whose last batch would hold a single row (its batch
    variance is 0): pass ``drop_last=True`` or another ``batch_size``.
    """
    X = np.asarray(X, dtype=np.float64)
    _check_fit_arguments(net, X, y, epochs, batch_size, drop_last)
    optimizer = optimizer if optimizer is not None else Adam(1e-3)
    rng = np.random.default_rng(seed)
    slices = batch_slices(len(X), batch_size, drop_last)
    history = History()
    total = epochs * len(slices)
    for _ in range(epochs):
        order = rng.permutation(len(X)) if shuffle else np.arange(len(X))
        losses = []
        for part in slices:
            rows = order[part]
            loss = net.train_step(X[rows], np.asarray(y)[rows], optimizer)
            losses.append(loss)
            if record:
                history.record(net, loss, len(rows))
            else:
                history.loss.append(loss)
            if progress is not None:
                progress(len(history.loss), total, loss)
        history.epoch_loss.append(float(np.mean(losses)))
    return history


def _check_fit_arguments(
    net: Trainable, X: np.ndarray, y: np.ndarray, epochs: int, batch_size: int, drop_last: bool
) -> None:
    if int(epochs) < 1:
        raise ValueError(f"epochs must be at least 1, got {epochs}")
    if int(batch_size) < 2 and net.batchnorm_layers:
        raise ValueError(f"batch_size must be at least 2 with batch norm, got {batch_size}")
    if len(X) < 2:
        raise ValueError(f"need at least 2 training rows, got {len(X)}")
    if len(y) != len(X):
        raise ValueError(f"X has {len(X)} rows but y has {len(y)} labels")
    if not drop_last and net.batchnorm_layers and len(X) % batch_size == 1:
        raise ValueError(
            f"{len(X)} rows in batches of {batch_size} leave a last batch of 1 row, which batch "
            "norm cannot normalize; use drop_last=True or another batch size"
        )
