"""Flax models for the tests (NNX and Linen), each with an independent NumPy float64 forward
giving every BN layer's input."""

from __future__ import annotations

from typing import Any

import numpy as np

from tests.optional import optional_import

flax = optional_import("flax")
jax = optional_import("jax")
nnx = flax.nnx
nn = flax.linen


def f64(value: Any) -> np.ndarray:
    return np.asarray(value, np.float64)


def bn_np(z: np.ndarray, scale: Any, bias: Any, eps: float, stats: Any) -> np.ndarray:
    axes = tuple(range(z.ndim - 1))
    mean, var = stats if stats is not None else (z.mean(axis=axes), z.var(axis=axes))
    return (z - mean) / np.sqrt(var + eps) * f64(scale) + f64(bias)


class Block(nnx.Module):
    def __init__(self, din: int, dout: int, rngs: Any) -> None:
        self.linear = nnx.Linear(din, dout, rngs=rngs)
        self.bn = nnx.BatchNorm(dout, momentum=0.9, rngs=rngs)

    def __call__(self, x: Any) -> Any:
        return nnx.relu(self.bn(self.linear(x)))


class Net(nnx.Module):
    """Linear -> BN -> Dropout -> Block(Linear -> BN) -> Linear -> BN (nested module)."""

    def __init__(self, rngs: Any) -> None:
        self.linear = nnx.Linear(6, 8, rngs=rngs)
        self.bn = nnx.BatchNorm(8, rngs=rngs)
        self.drop = nnx.Dropout(0.5, rngs=rngs)
        self.block = Block(8, 7, rngs)
        self.head = nnx.Linear(7, 5, rngs=rngs)
        self.head_bn = nnx.BatchNorm(5, rngs=rngs)

    def __call__(self, x: Any) -> Any:
        h = self.drop(self.bn(self.linear(x)))
        return self.head_bn(self.head(self.block(h)))

    def batchnorms(self) -> list[Any]:
        return [self.bn, self.block.bn, self.head_bn]

    def inputs(self, x: np.ndarray, stats: list | None) -> list[np.ndarray]:
        def lin(layer: Any, h: np.ndarray) -> np.ndarray:
            return h @ f64(layer.kernel[...]) + f64(layer.bias[...])

        def bn(layer: Any, z: np.ndarray, i: int) -> np.ndarray:
            chosen = stats[i] if stats is not None else None
            return bn_np(z, layer.scale[...], layer.bias[...], layer.epsilon, chosen)

        z1 = lin(self.linear, x)
        z2 = lin(self.block.linear, bn(self.bn, z1, 0))
        return [z1, z2, lin(self.head, np.maximum(bn(self.block.bn, z2, 1), 0))]


def net(rng: np.random.Generator) -> Net:
    model = Net(nnx.Rngs(0))
    for bn in model.batchnorms():
        c = bn.mean[...].shape[0]
        bn.scale[...] = rng.uniform(0.5, 2.0, c).astype("float32")
        bn.bias[...] = rng.normal(size=c).astype("float32")
        bn.mean[...] = rng.normal(size=c).astype("float32")
        bn.var[...] = rng.uniform(0.5, 3.0, c).astype("float32")
    return model


class LinenNet(nn.Module):
    """Dense -> BN -> Dropout -> Dense -> BN over (N, T, D) inputs (BN over N*T values);
    ``keywords``: the first BN and the Dropout are called with keyword arguments."""

    keywords: bool = False

    @nn.compact
    def __call__(self, x: Any, train: bool) -> Any:
        bn0 = nn.BatchNorm(use_running_average=not train, name="bn0")
        drop = nn.Dropout(0.5, deterministic=not train)
        x = nn.Dense(8, name="d0")(x)
        x = bn0(x=x) if self.keywords else bn0(x)
        x = drop(inputs=nn.relu(x)) if self.keywords else drop(nn.relu(x))
        return nn.BatchNorm(use_running_average=not train, name="bn1")(nn.Dense(5, name="d1")(x))


def linen_inputs(variables: Any, x: np.ndarray) -> list[np.ndarray]:
    params = variables["params"]

    def lin(name: str, h: np.ndarray) -> np.ndarray:
        return h @ f64(params[name]["kernel"]) + f64(params[name]["bias"])

    z1 = lin("d0", x)
    h = np.maximum(bn_np(z1, params["bn0"]["scale"], params["bn0"]["bias"], 1e-5, None), 0)
    return [z1, lin("d1", h)]


def population(parts: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    values = np.concatenate([p.reshape(-1, p.shape[-1]) for p in parts])
    return values.mean(axis=0), values.var(axis=0)


def assert_close(got_mean: Any, got_var: Any, expected: tuple[np.ndarray, np.ndarray]) -> None:
    """Within 1e-5 of the reference's standard deviation."""
    mean, var = expected
    std = np.sqrt(var)
    np.testing.assert_array_less(np.abs(f64(got_mean) - mean), 1e-5 * std)
    np.testing.assert_array_less(np.abs(np.sqrt(f64(got_var)) - std), 1e-5 * std)


def batches(rng: np.random.Generator, sizes: list[int], shape: tuple[int, ...]) -> list:
    return [(rng.normal(size=(n, *shape)) * 2.5 + 1.5).astype("float32") for n in sizes]
