"""A sequential network of engine layers, its loss, and test-time prediction.

The network is the lecture's system end to end: mini-batches go through Linear ->
BatchNorm -> ReLU blocks, each BatchNorm feeds its estimators, and at test time every
BatchNorm normalizes with the estimate chosen by ``stats``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from bnstats import functional as F
from bnstats.engine import checkpoint, training
from bnstats.engine.layers import BATCH, BatchNorm, Layer, Linear, ReLU
from bnstats.engine.optim import Optimizer
from bnstats.stats import Estimator, Population

NormFactory = Callable[..., BatchNorm]
"""A normalization layer's class or a ``functools.partial`` of one, called as
``norm(num_features, eps=eps, estimators=estimators)``: ``BatchNorm``,
``partial(GhostBatchNorm, ghost_size=16)``, ``partial(BatchRenorm, schedule=...)``."""


def softmax_cross_entropy(logits: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
    """Mean cross-entropy of softmax(logits) against integer labels ``y``, and its gradient.

    ``loss = mean(logsumexp(logits) - logits[y])``; ``dlogits = (softmax(logits) - onehot(y)) / N``.
    """
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    n = logits.shape[0]
    loss = -float(log_probs[np.arange(n), y].mean())
    dlogits = np.exp(log_probs)
    dlogits[np.arange(n), y] -= 1.0
    return loss, dlogits / n


class Network:
    """Layers applied in order; ``forward`` in training or with chosen test-time statistics."""

    def __init__(self, layers: Sequence[Layer]) -> None:
        self.layers = list(layers)
        _name_layers(self.layers)

    @classmethod
    def mlp(
        cls,
        sizes: Sequence[int],
        batchnorm: bool = True,
        seed: int = 0,
        estimators: Mapping[str, Estimator] | None = None,
        eps: float = 1e-5,
        norm: NormFactory | None = BatchNorm,
    ) -> Network:
        """``sizes = [inputs, hidden..., classes]``: Linear -> ``norm`` -> ReLU per hidden layer
        (Linear with a bias -> ReLU with ``norm=None``), then a Linear output. Each
        normalization layer is ``norm(width, eps=eps, estimators=estimators)`` and keeps its own
        copy of ``estimators`` (default ``{"ema": EMA(0.1)}``). ``batchnorm=False`` is
        ``norm=None``. Raises ``ValueError`` for bad sizes and ``TypeError`` for a ``norm``
        that does not build a :class:`BatchNorm`."""
        if len(sizes) < 2 or any(int(s) < 1 for s in sizes):
            raise ValueError(f"mlp needs at least [inputs, outputs], all positive; got {sizes}")
        norm = norm if batchnorm else None
        rng = np.random.default_rng(seed)
        layers: list[Layer] = []
        for d_in, d_out in zip(sizes[:-2], sizes[1:-1], strict=True):
            layers.append(Linear(d_in, d_out, bias=norm is None, rng=rng))
            if norm is not None:
                layers.append(_norm_layer(norm, d_out, eps, estimators))
            layers.append(ReLU())
        layers.append(Linear(sizes[-2], sizes[-1], bias=True, rng=rng))
        return cls(layers)

    @property
    def batchnorm_layers(self) -> list[BatchNorm]:
        return [layer for layer in self.layers if isinstance(layer, BatchNorm)]

    def batchnorm_layer(self, name: str | None = None) -> BatchNorm:
        """The BatchNorm layer called ``name`` (default: the first); ``ValueError`` naming the
        layers there are otherwise."""
        layers = self.batchnorm_layers
        if not layers:
            raise ValueError("the network has no BatchNorm layer")
        if name is None:
            return layers[0]
        for layer in layers:
            if layer.name == name:
                return layer
        raise ValueError(
            f"no BatchNorm layer named {name!r}; the network's BatchNorm layers are "
            f"{', '.join(layer.name for layer in layers)}"
        )

    @property
    def in_features(self) -> int | None:
        first = next((layer for layer in self.layers if isinstance(layer, Linear)), None)
        return None if first is None else first.in_features

    @property
    def out_features(self) -> int | None:
        last = next((ly for ly in reversed(self.layers) if isinstance(ly, Linear)), None)
        return None if last is None else last.out_features

    @property
    def stats_names(self) -> list[str]:
        """Estimator names every BatchNorm layer has, plus ``"batch"``."""
        layers = self.batchnorm_layers
        if not layers:
            return [BATCH]
        common = [k for k in layers[0].estimators if all(k in b.estimators for b in layers)]
        return [*common, BATCH]

    def forward(
        self,
        x: np.ndarray,
        training: bool = False,
        stats: str | None = None,
        update: Mapping[str, Iterable[Estimator]] | None = None,
    ) -> np.ndarray:
        """Logits for ``x``. ``training`` normalizes with batch statistics and feeds the
        estimators (``update`` maps a BatchNorm's name to the estimators to feed instead);
        otherwise ``stats`` names the estimate to normalize with, or ``"batch"``."""
        out = self._check_input(x)
        for layer in self.layers:
            targets = None if update is None else update.get(layer.name)
            out = layer.forward(out, training=training, stats=stats, update=targets)
        return out

    def backward(self, dlogits: np.ndarray) -> np.ndarray:
        """Backpropagate; each layer stores its ``grads``. Returns the input's gradient."""
        grad = dlogits
        for layer in reversed(self.layers):
            grad = layer.backward(grad)
        return grad

    def parameters(self) -> list[tuple[str, np.ndarray, np.ndarray]]:
        """``(name, array, gradient)`` of every learnable array, e.g. ``("bn1.weight", ...)``."""
        return [
            (f"{layer.name}.{key}", value, layer.grads.get(key))
            for layer in self.layers
            for key, value in layer.params.items()
        ]

    def train_step(self, x: np.ndarray, y: np.ndarray, optimizer: Optimizer) -> float:
        """One mini-batch: forward with batch statistics, loss, backward, optimizer step."""
        labels = self._check_labels(y, len(x))
        logits = self.forward(x, training=True)
        loss, dlogits = softmax_cross_entropy(logits, labels)
        self.backward(dlogits)
        optimizer.step(self.parameters())
        return loss

    def fit(self, X: np.ndarray, y: np.ndarray, **kwargs: Any) -> training.History:
        """Mini-batch training; see :func:`bnstats.engine.training.fit` for the options."""
        return training.fit(self, X, y, **kwargs)

    def logits(
        self, X: np.ndarray, stats: str | None = None, batch_size: int | None = None
    ) -> np.ndarray:
        """Test-time logits. With running estimates any ``batch_size`` gives the same numbers;
        with ``stats="batch"`` each chunk of ``batch_size`` rows is normalized by itself."""
        if batch_size is not None and int(batch_size) < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        X = np.asarray(X, dtype=np.float64)
        size = len(X) if batch_size is None else int(batch_size)
        chunks = [X[i : i + size] for i in range(0, len(X), max(size, 1))]
        return np.concatenate([self.forward(c, stats=stats) for c in chunks])

    def predict(
        self, X: np.ndarray, stats: str | None = None, batch_size: int | None = None
    ) -> np.ndarray:
        """Predicted class of each row (argmax of :meth:`logits`)."""
        return self.logits(X, stats, batch_size).argmax(axis=1)

    def evaluate(
        self,
        X: np.ndarray,
        y: np.ndarray,
        stats: str | None = None,
        batch_size: int | None = None,
    ) -> float:
        """Accuracy of :meth:`predict` against labels ``y``."""
        labels = self._check_labels(y, len(X))
        return float((self.predict(X, stats, batch_size) == labels).mean())

    def recalibrate(
        self,
        X: np.ndarray,
        batch_size: int = 64,
        name: str = "population",
        mode: Literal["train", "eval"] = "train",
    ) -> Network:
        """Exact population statistics of every BatchNorm over ``X``, weights frozen.

        ``mode="train"``: one pass in mini-batches as in training (each BatchNorm normalizes
        with its batch's statistics, so every layer sees the inputs it saw in training)
        feeding a fresh :class:`~bnstats.stats.Population` per layer; no other estimator
        moves. Batches are near-equal splits of ``X``, so none has a single row. This is
        PreciseBN (Wu & Johnson 2021).

        ``mode="eval"``: each BatchNorm gets the mean and unbiased variance of the input it
        receives at test time, when every BatchNorm before it normalizes with its own final
        population statistics (the fixed point of eval-mode inference). The layers run in
        order over all of ``X`` (in chunks of ``batch_size`` rows, which only bound memory:
        in eval mode a row's output does not depend on the others): at a BatchNorm the
        Population of its input over every chunk is complete before any chunk goes on, so
        the cost is one forward pass over ``X``; chunks of one row are fine
        (``batch_size=1``).

        The result is stored as estimator ``name`` (replacing one of that name) only once
        the pass has succeeded.
        """
        X = self._check_input(X)
        if mode not in ("train", "eval"):
            raise ValueError(f"mode must be 'train' or 'eval', got {mode!r}")
        if len(X) < 2:
            raise ValueError(f"recalibrate needs at least 2 rows, got {len(X)}")
        parts = max(1, -(-len(X) // int(batch_size)))
        if mode == "train":
            parts = min(parts, len(X) // 2)  # batch_size 2 on an odd count: no row alone
        chunks = np.array_split(X, parts)
        if mode == "eval":
            fresh = self._eval_mode_populations(chunks)
        else:
            fresh = {layer.name: Population() for layer in self.batchnorm_layers}
            for chunk in chunks:
                self.forward(chunk, training=True, update={k: [v] for k, v in fresh.items()})
        for layer in self.batchnorm_layers:
            layer.estimators[name] = fresh[layer.name]
        return self

    def _eval_mode_populations(self, chunks: list[np.ndarray]) -> dict[str, Population]:
        """Layer by layer over every chunk: each BatchNorm's Population of its input, then
        the chunks normalized with it (under a temporary estimator name, removed after)."""
        fresh: dict[str, Population] = {}
        key = "__eval_mode_recalibration__"
        try:
            for layer in self.layers:
                if isinstance(layer, BatchNorm):
                    population = Population()
                    for chunk in chunks:
                        mean, var = F.moments(chunk)
                        population.update(mean, var, F.count_per_channel(chunk.shape))
                    fresh[layer.name] = layer.estimators[key] = population
                chunks = [layer.forward(chunk, training=False, stats=key) for chunk in chunks]
        finally:
            for layer in self.batchnorm_layers:
                layer.estimators.pop(key, None)
        return fresh

    def save(self, path: str | Path) -> Path:
        """Write weights, estimators and architecture to ``path`` (atomically)."""
        return checkpoint.save(self.layers, path)

    @classmethod
    def load(cls, path: str | Path) -> Network:
        """Read a network written by :meth:`save`; see :func:`bnstats.engine.checkpoint.load`."""
        return cls(checkpoint.load(path))

    def _check_input(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        width = self.in_features
        if width is not None and (x.ndim != 2 or x.shape[1] != width):
            raise ValueError(f"Network expects input of shape (N, {width}), got {x.shape}")
        return x

    def _check_labels(self, y: np.ndarray, n: int) -> np.ndarray:
        y = np.asarray(y)
        if y.shape != (n,):
            raise ValueError(f"labels must have shape ({n},), got {y.shape}")
        if not np.issubdtype(y.dtype, np.integer):
            raise ValueError(f"labels must be integers, got dtype {y.dtype}")
        classes = self.out_features
        if n and classes is not None and (y.min() < 0 or y.max() >= classes):
            raise ValueError(f"labels must lie in [0, {classes}), got {y.min()}..{y.max()}")
        return y

    def __repr__(self) -> str:
        inner = "\n".join(f"  {layer!r}" for layer in self.layers)
        return f"Network(\n{inner}\n)"


def _norm_layer(
    norm: NormFactory, features: int, eps: float, estimators: Mapping[str, Estimator] | None
) -> BatchNorm:
    if not callable(norm):
        raise TypeError(
            "mlp: norm must be a layer class such as BatchNorm, a partial of one such as "
            f"partial(GhostBatchNorm, ghost_size=16), or None; got {norm!r}"
        )
    layer = norm(features, eps=eps, estimators=estimators)
    if not isinstance(layer, BatchNorm):
        raise TypeError(f"mlp: norm must build a BatchNorm layer, got {type(layer).__name__}")
    return layer


def _name_layers(layers: list[Layer]) -> None:
    """Give unnamed layers PyTorch-like names numbered per kind: linear1, bn1, relu1, ...
    (every batch-norm kind is a ``bn``)."""
    prefixes = {"Linear": "linear", "BatchNorm": "bn", "ReLU": "relu"}
    counts: dict[str, int] = {}
    for layer in layers:
        kind = "BatchNorm" if isinstance(layer, BatchNorm) else layer.kind
        prefix = prefixes.get(kind, kind.lower())
        counts[prefix] = counts.get(prefix, 0) + 1
        if not layer.name:
            layer.name = f"{prefix}{counts[prefix]}"
    names = [layer.name for layer in layers]
    if len(set(names)) != len(names):
        raise ValueError(f"layer names must be unique, got {names}")
