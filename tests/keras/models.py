"""Keras models for the tests, each with an independent NumPy float64 forward that gives
every BN layer's input, for the reference population statistics."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from tests.optional import optional_import

keras = optional_import("keras")

EPS = 1e-3


def randomize(model: Any, rng: np.random.Generator) -> None:
    """Random gamma, beta and moving statistics for every BN layer (so that no default hides
    a mistake)."""
    for layer in model._flatten_layers(include_self=False, recursive=True):
        if isinstance(layer, keras.layers.BatchNormalization):
            c = layer.moving_mean.shape[0]
            layer.gamma.assign(rng.uniform(0.5, 2.0, c).astype("float32"))
            layer.beta.assign(rng.normal(size=c).astype("float32"))
            layer.moving_mean.assign(rng.normal(size=c).astype("float32"))
            layer.moving_variance.assign(rng.uniform(0.5, 3.0, c).astype("float32"))


def _w(layer: Any) -> tuple[np.ndarray, np.ndarray]:
    kernel, bias = (np.asarray(keras.ops.convert_to_numpy(v), np.float64) for v in layer.weights)
    return kernel, bias


def bn_np(layer: Any, z: np.ndarray, stats: tuple[np.ndarray, np.ndarray] | None) -> np.ndarray:
    """The BN layer in float64: with ``stats`` (mean, var), else the batch's own (biased)."""
    axes = tuple(range(z.ndim - 1))
    mean, var = stats if stats is not None else (z.mean(axis=axes), z.var(axis=axes))
    gamma = np.asarray(keras.ops.convert_to_numpy(layer.gamma), np.float64)
    beta = np.asarray(keras.ops.convert_to_numpy(layer.beta), np.float64)
    return (z - mean) / np.sqrt(var + layer.epsilon) * gamma + beta


@dataclass
class Case:
    """A model, its BN layers in order, and ``inputs(x, stats)``: the float64 input of every
    BN layer for a batch ``x``, the layers normalizing with ``stats[i]`` (or, None, with the
    batch's own statistics)."""

    model: Any
    bns: list[Any]
    inputs: Any
    shape: tuple[int, ...]


def mlp(rng: np.random.Generator) -> Case:
    """Functional: Dense -> BN -> ReLU -> Dropout -> Dense -> BN."""
    inp = keras.Input((6,))
    d1, bn1 = keras.layers.Dense(8), keras.layers.BatchNormalization()
    d2, bn2 = keras.layers.Dense(5), keras.layers.BatchNormalization()
    h = bn1(d1(inp))
    h = keras.layers.Dropout(0.5)(keras.layers.ReLU()(h))
    model = keras.Model(inp, bn2(d2(h)))
    randomize(model, rng)

    def inputs(x: np.ndarray, stats: list | None) -> list[np.ndarray]:
        z1 = x @ _w(d1)[0] + _w(d1)[1]
        h = np.maximum(bn_np(bn1, z1, stats and stats[0]), 0)
        return [z1, h @ _w(d2)[0] + _w(d2)[1]]

    return Case(model, [bn1, bn2], inputs, (6,))


class Block(keras.layers.Layer):
    """A custom layer holding a Dense and a BN (a sublayer of a subclassed model)."""

    def __init__(self, units: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.dense = keras.layers.Dense(units)
        self.bn = keras.layers.BatchNormalization()

    def call(self, x: Any, training: Any = None) -> Any:
        return keras.ops.relu(self.bn(self.dense(x), training=training))


class Subclassed(keras.Model):
    """Dense -> BN -> Dropout -> Block(Dense -> BN) -> nested Sequential(Dense -> BN)."""

    def __init__(self) -> None:
        super().__init__()
        self.dense = keras.layers.Dense(7)
        self.bn = keras.layers.BatchNormalization()
        self.drop = keras.layers.Dropout(0.3)
        self.block = Block(6)
        self.head = keras.Sequential(
            [keras.layers.Dense(4), keras.layers.BatchNormalization(momentum=0.9)]
        )

    def call(self, x: Any, training: Any = None) -> Any:
        h = self.drop(self.bn(self.dense(x), training=training), training=training)
        return self.head(self.block(h, training=training), training=training)


def subclassed(rng: np.random.Generator) -> Case:
    model = Subclassed()
    model(np.zeros((2, 3, 6), "float32"))  # build: (N, T, D) input, BN over N*T values
    randomize(model, rng)
    head_dense, head_bn = model.head.layers

    def inputs(x: np.ndarray, stats: list | None) -> list[np.ndarray]:
        z1 = x @ _w(model.dense)[0] + _w(model.dense)[1]
        h = bn_np(model.bn, z1, stats and stats[0])
        z2 = h @ _w(model.block.dense)[0] + _w(model.block.dense)[1]
        h = np.maximum(bn_np(model.block.bn, z2, stats and stats[1]), 0)
        return [z1, z2, h @ _w(head_dense)[0] + _w(head_dense)[1]]

    return Case(model, [model.bn, model.block.bn, head_bn], inputs, (3, 6))


def nested(rng: np.random.Generator) -> Case:
    """A functional model whose middle is a Sequential model, itself holding a BN."""
    inner = keras.Sequential(
        [keras.Input((8,)), keras.layers.Dense(5), keras.layers.BatchNormalization()]
    )
    inp = keras.Input((6,))
    d1, bn1 = keras.layers.Dense(8), keras.layers.BatchNormalization(epsilon=1e-5)
    bn3 = keras.layers.BatchNormalization()
    model = keras.Model(inp, bn3(keras.layers.ReLU()(inner(bn1(d1(inp))))))
    randomize(model, rng)
    inner_dense, inner_bn = inner.layers

    def inputs(x: np.ndarray, stats: list | None) -> list[np.ndarray]:
        z1 = x @ _w(d1)[0] + _w(d1)[1]
        h = bn_np(bn1, z1, stats and stats[0])
        z2 = h @ _w(inner_dense)[0] + _w(inner_dense)[1]
        return [z1, z2, np.maximum(bn_np(inner_bn, z2, stats and stats[1]), 0)]

    return Case(model, [bn1, inner_bn, bn3], inputs, (6,))


class SameNames(keras.Model):
    """Three ``Block(name="block")`` in a row, each with its BN named ``"bn"``: Keras allows
    siblings of one name outside functional models."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = [Block(5, name="block") for _ in range(3)]

    def call(self, x: Any, training: Any = None) -> Any:
        for block in self.blocks:
            x = block(x, training=training)
        return x


def same_names(rng: np.random.Generator) -> Case:
    model = SameNames()
    model(np.zeros((2, 6), "float32"))
    randomize(model, rng)

    def inputs(x: np.ndarray, stats: list | None) -> list[np.ndarray]:
        found, h = [], x
        for i, block in enumerate(model.blocks):
            found.append(h @ _w(block.dense)[0] + _w(block.dense)[1])
            h = np.maximum(bn_np(block.bn, found[-1], stats and stats[i]), 0)
        return found

    return Case(model, [block.bn for block in model.blocks], inputs, (6,))


CASES = {"mlp": mlp, "subclassed": subclassed, "nested": nested, "same_names": same_names}


def data_for(case: Case, rng: np.random.Generator, sizes: list[int]) -> list[np.ndarray]:
    """Batches of these sizes, shifted and scaled so the statistics are far from 0 and 1."""
    return [(rng.normal(size=(n, *case.shape)) * 2.5 + 1.5).astype("float32") for n in sizes]


def train_reference(case: Case, batches: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Each BN layer's population (mean, variance over all values) with every BN layer
    normalizing with its batch's statistics."""
    collected = [case.inputs(x.astype(np.float64), None) for x in batches]
    return [_population([c[i] for c in collected]) for i in range(len(case.bns))]


def eval_reference(case: Case, batches: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Each BN layer's population with every BN layer before it normalizing with its own
    final statistics (computed level by level over all the data)."""
    x = np.concatenate(batches).astype(np.float64)
    stats: list = []
    for i in range(len(case.bns)):
        padded = stats + [None] * (len(case.bns) - len(stats))
        stats.append(_population([_inputs_with(case, x, padded)[i]]))
    return stats


def _inputs_with(case: Case, x: np.ndarray, stats: list) -> list[np.ndarray]:
    return case.inputs(x, _StatsOrFail(stats))


class _StatsOrFail(list):
    """``stats[i]`` for settled layers; a layer not settled yet must not be needed."""

    def __getitem__(self, i: int) -> Any:
        value = super().__getitem__(i)
        return value if value is not None else (np.nan, np.nan)


def _population(parts: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    values = np.concatenate([p.reshape(-1, p.shape[-1]) for p in parts])
    return values.mean(axis=0), values.var(axis=0)


def assert_statistics(layer: Any, expected: tuple[np.ndarray, np.ndarray]) -> None:
    """The layer's moving statistics within 1e-5 of the reference's standard deviation
    (float32 rounding of the inputs and of the stored values)."""
    mean, var = expected
    std = np.sqrt(var)
    got_mean = np.asarray(keras.ops.convert_to_numpy(layer.moving_mean), np.float64)
    got_var = np.asarray(keras.ops.convert_to_numpy(layer.moving_variance), np.float64)
    np.testing.assert_array_less(np.abs(got_mean - mean), 1e-5 * std, err_msg=layer.name)
    np.testing.assert_array_less(np.abs(np.sqrt(got_var) - std), 1e-5 * std, err_msg=layer.name)


def snapshot(model: Any) -> list[np.ndarray]:
    return [np.array(keras.ops.convert_to_numpy(v)) for v in model.weights]
