"""Keras and Flax ``mode="eval"``: the one batch against the levels, on the same model and data.

Where the data's largest BN input is at most 256 MiB, ``bnstats.keras.recalibrate`` and
``bnstats.flax.recalibrate_nnx`` in ``mode="eval"`` run all the data as one batch after their
first pass, then one pass to check (:mod:`bnstats._host_one_batch`); elsewhere they measure
one depth level per pass. For each case: the levels (the one batch switched off,
``ONE_BATCH_BYTES = 0``) and the one batch, each with the passes over the batches (the one
batch adds one forward of the joined data), CPU seconds (every thread of the process, JAX's
compilations included) and wall seconds, and the worst difference between the two results
over every channel (``|d var| / var``, ``|d mean| / sqrt(var)``).

Cases: Keras (JAX backend) 30 Dense(64) + BN + ReLU blocks on 64 batches of 32 samples; Keras
10 Conv2D(16, 3x3) + BN + ReLU blocks on 32 batches of 16 images 16x16x3; Flax NNX 30
Linear(64) + BatchNorm + relu blocks on 64 batches of 32; Flax NNX 10 Conv(16, 3x3) +
BatchNorm + relu blocks on 32 batches of 16 images 16x16x3. Random weights, BN's ``gamma`` and
``beta`` drawn so that every layer's eval-mode input differs from its training one.

Run: ``KERAS_BACKEND=jax PYTHONPATH=src:. python -m benchmarks.eval_host_one_batch`` (about a
minute); ``--cases keras_mlp,keras_conv,nnx_mlp,nnx_conv`` picks some.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
from tests.counted import Counted

from bnstats import _one_batch

os.environ.setdefault("KERAS_BACKEND", "jax")

CASES = ("keras_mlp", "keras_conv", "nnx_mlp", "nnx_conv")

Statistics = list[tuple[np.ndarray, np.ndarray]]


def worst_difference(a: Statistics, b: Statistics) -> float:
    """The largest ``|d mean| / sqrt(var)`` or ``|d var| / var`` over every channel."""
    worst = 0.0
    for (mean_a, var_a), (mean_b, var_b) in zip(a, b, strict=True):
        worst = max(
            worst,
            float(np.max(np.abs(mean_a - mean_b) / np.sqrt(var_b))),
            float(np.max(np.abs(var_a - var_b) / var_b)),
        )
    return worst


def keras_model(
    case: str, rng: np.random.Generator, count: int | None
) -> tuple[Any, list[np.ndarray]]:
    """The Keras model of ``case`` and its batches (``count`` of them, or the case's own)."""
    import keras

    keras.utils.set_random_seed(0)
    if case == "keras_mlp":
        shape, blocks, batches = (64,), [keras.layers.Dense(64) for _ in range(30)], (64, 32)
    else:
        shape = (16, 16, 3)
        blocks = [keras.layers.Conv2D(16, 3, padding="same") for _ in range(10)]
        batches = (32, 16)
    layers: list[Any] = [keras.Input(shape)]
    for block in blocks:
        layers += [block, keras.layers.BatchNormalization(), keras.layers.ReLU()]
    model = keras.Sequential(layers)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            width = layer.gamma.shape[0]
            layer.gamma.assign(rng.uniform(0.5, 2.0, width).astype("float32"))
            layer.beta.assign(rng.normal(size=width).astype("float32"))
    count, size = (count or batches[0]), batches[1]
    data = [rng.normal(1.0, 2.0, (size, *shape)).astype("float32") for _ in range(count)]
    return model, data


def keras_statistics(model: Any) -> Statistics:
    import keras

    return [
        (
            np.asarray(keras.ops.convert_to_numpy(layer.moving_mean), np.float64),
            np.asarray(keras.ops.convert_to_numpy(layer.moving_variance), np.float64),
        )
        for layer in model.layers
        if isinstance(layer, keras.layers.BatchNormalization)
    ]


def nnx_model(
    case: str, rng: np.random.Generator, count: int | None
) -> tuple[Any, list[np.ndarray]]:
    """The NNX model of ``case`` and its batches (``count`` of them, or the case's own)."""
    from flax import nnx

    if case == "nnx_mlp":
        blocks, width, shape, batches = 30, 64, (64,), (64, 32)
    else:
        blocks, width, shape, batches = 10, 16, (16, 16, 3), (32, 16)

    class Chain(nnx.Module):
        def __init__(self, rngs: Any) -> None:
            widths = [shape[-1]] + [width] * blocks
            self.linears = nnx.List(
                [
                    nnx.Linear(widths[i], width, rngs=rngs)
                    if case == "nnx_mlp"
                    else nnx.Conv(widths[i], width, (3, 3), rngs=rngs)
                    for i in range(blocks)
                ]
            )
            self.norms = nnx.List([nnx.BatchNorm(width, rngs=rngs) for _ in range(blocks)])

        def __call__(self, x: Any) -> Any:
            for linear, norm in zip(self.linears, self.norms, strict=True):
                x = nnx.relu(norm(linear(x)))
            return x

    model = Chain(nnx.Rngs(0))
    for norm in model.norms:
        norm.scale[...] = rng.uniform(0.5, 2.0, width).astype("float32")
        norm.bias[...] = rng.normal(size=width).astype("float32")
    count, size = (count or batches[0]), batches[1]
    data = [rng.normal(1.0, 2.0, (size, *shape)).astype("float32") for _ in range(count)]
    return model, data


def nnx_statistics(model: Any) -> Statistics:
    return [
        (np.asarray(norm.mean[...], np.float64), np.asarray(norm.var[...], np.float64))
        for norm in model.norms
    ]


Runner = tuple[Callable[[Counted], Any], Callable[[], Statistics], list[np.ndarray]]


def runner(case: str, count: int | None = None) -> Runner:
    """``run(batches)`` (one eval-mode recalibration), the model's statistics now, and the
    data (``count`` batches, or the case's own number)."""
    rng = np.random.default_rng(0)
    if case.startswith("keras"):
        import bnstats.keras

        model, data = keras_model(case, rng, count)
        return (
            lambda batches: bnstats.keras.recalibrate(model, batches, mode="eval", progress=False),
            lambda: keras_statistics(model),
            data,
        )
    import bnstats.flax

    model, data = nnx_model(case, rng, count)
    return (
        lambda batches: bnstats.flax.recalibrate_nnx(model, batches, mode="eval", progress=False),
        lambda: nnx_statistics(model),
        data,
    )


def timed(run: Callable[[Counted], Any], data: list[np.ndarray]) -> tuple[int, float, float]:
    """Passes over the batches, CPU and wall seconds of ``run``."""
    batches = Counted(data)
    cpu, wall = time.process_time(), time.perf_counter()
    run(batches)
    return batches.drawn, time.process_time() - cpu, time.perf_counter() - wall


def compare(case: str, count: int | None = None) -> str:
    """One line: the levels against the one batch on ``case`` (``count`` batches)."""
    run, statistics, data = runner(case, count)
    budget = _one_batch.ONE_BATCH_BYTES
    _one_batch.ONE_BATCH_BYTES = 0
    try:
        levels = timed(run, data)
    finally:
        _one_batch.ONE_BATCH_BYTES = budget
    by_levels = statistics()
    one = timed(run, data)
    worst = worst_difference(statistics(), by_levels)
    return (
        f"{case:10s} {len(by_levels):2d} BN layers  levels {levels[0]:2d} passes "
        f"{levels[1]:6.1f} s CPU {levels[2]:5.1f} s wall  one batch {one[0]:2d} + 1 "
        f"{one[1]:6.1f} s CPU {one[2]:5.1f} s wall  {levels[1] / one[1]:4.1f}x CPU  "
        f"worst difference {worst:.1e}"
    )


def cases_from(text: str, known: Iterable[str]) -> list[str]:
    """The comma-separated cases of ``--cases``; ``SystemExit`` naming one not ``known``."""
    known = list(known)
    cases = text.split(",")
    for case in cases:
        if case not in known:
            raise SystemExit(f"unknown case {case!r}; choose from {', '.join(known)}")
    return cases


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=",".join(CASES))
    args = parser.parse_args(argv)
    for case in cases_from(args.cases, CASES):
        print(compare(case), flush=True)


if __name__ == "__main__":
    main()
