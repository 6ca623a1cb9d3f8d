"""Keras and Flax ``mode="eval"`` over data larger than the one-batch budget: the subset
against the levels, on the same model and data.

Where the data's largest BN input is over the budget (``one_batch_bytes``, 256 MiB by
default), ``bnstats.keras.recalibrate`` and ``bnstats.flax.recalibrate_nnx`` in
``mode="eval"`` solve the fixed point on the first batches that fit it, joined, and correct
it by whole passes (:mod:`bnstats._host_subset`); before, they measured one depth level per
pass. To time that on this machine the budget is cut to a ``1 / share`` of the data's
largest BN input (8 by default): the data are ``share`` times larger than what fits, as a
data set of full-size images is at the default budget. For each case: the levels (budget 0)
and the subset, each with its passes over the data (the subset adds its forwards over the
joined subset, counted apart), CPU seconds (every thread, JAX's compilations included) and
wall seconds, and the worst difference between the two results over every channel
(``|d var| / var``, ``|d mean| / sqrt(var)``).

Cases (the models of :mod:`benchmarks.eval_host_one_batch`, JAX backend, random weights):
Keras 10 Conv2D(16, 3x3) + BN + ReLU blocks and Flax NNX 10 Conv(16, 3x3) + BatchNorm +
relu blocks on 256 batches of 16 images 16x16x3; Keras 30 Dense(64) + BN + ReLU blocks on 256
batches of 32, a chain whose statistics amplify what the subset cannot see (the rounds stop
shrinking and the levels take over: what that costs).

Models of ``keras.applications`` too (random weights, 32x32 images; :data:`APPLICATIONS`),
where asked: ``--cases keras_mobilenet_v2,keras_resnet50,keras_efficientnet_b0 --count 32
--share 4`` (256 images, the first 64 the subset; about 15 minutes, most of it the levels).
``--against one_batch`` compares with the data run as one batch instead of level by level
(within float32 rounding of it, in 3 passes): ``--cases keras_densenet121 --count 32
--share 4 --against one_batch``.

Run: ``KERAS_BACKEND=jax PYTHONPATH=src:. python -m benchmarks.eval_host_subset`` (about two
minutes); ``--cases keras_conv,nnx_conv,keras_mlp`` picks some, ``--count`` sets the batches,
``--share`` the data's size over the budget.
"""

from __future__ import annotations

import argparse
import math
import os
from typing import Any

import numpy as np

from benchmarks.eval_host_one_batch import (
    Runner,
    cases_from,
    keras_statistics,
    runner,
    timed,
    worst_difference,
)
from bnstats import _host_one_batch, _one_batch

os.environ.setdefault("KERAS_BACKEND", "jax")

CASES = ("keras_conv", "nnx_conv", "keras_mlp")

BN_BYTES_PER_SAMPLE = {"keras_conv": 16 * 16 * 16 * 4, "nnx_conv": 16 * 16 * 16 * 4}
"""Each case's largest BN input per sample (values of 4 bytes); the MLPs': 64 values."""

APPLICATIONS = {
    "keras_mobilenet_v2": "MobileNetV2",
    "keras_resnet50": "ResNet50",
    "keras_efficientnet_b0": "EfficientNetB0",
    "keras_densenet121": "DenseNet121",
}
"""Models of ``keras.applications`` (random weights, BN ``gamma`` and ``beta`` drawn, 10
classes) on batches of 8 images 32x32x3, picked by ``--cases``: level by level each takes
minutes."""


class SubsetForwards:
    """Counts the forwards over the joined subset (``Spent.subset``) of the calls it wraps."""

    def __init__(self) -> None:
        self.count = 0
        self._iterate = _host_one_batch.iterate_on_subset

    def __enter__(self) -> SubsetForwards:
        def counted(*args: Any) -> Any:
            result = self._iterate(*args)
            self.count += args[-1].subset
            return result

        _host_one_batch.iterate_on_subset = counted
        return self

    def __exit__(self, *exc: object) -> None:
        _host_one_batch.iterate_on_subset = self._iterate


def application(case: str, count: int) -> tuple[Runner, int]:
    """The runner of a ``keras.applications`` case (:data:`APPLICATIONS`, ``count`` batches)
    and its largest BN input per sample, in bytes (from the layers' output shapes)."""
    import keras

    import bnstats.keras

    keras.utils.set_random_seed(0)
    build = getattr(keras.applications, APPLICATIONS[case])
    model = build(weights=None, input_shape=(32, 32, 3), classes=10)
    rng = np.random.default_rng(0)
    norms = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    for norm in norms:
        width = norm.gamma.shape[0]
        norm.gamma.assign(rng.uniform(0.5, 1.5, width).astype("float32"))
        norm.beta.assign(rng.normal(0.0, 0.3, width).astype("float32"))
    data = [rng.normal(0.0, 1.0, (8, 32, 32, 3)).astype("float32") for _ in range(count)]
    per_sample = max(math.prod(norm.output.shape[1:]) for norm in norms) * 4
    return (
        lambda batches: bnstats.keras.recalibrate(model, batches, mode="eval", progress=False),
        lambda: keras_statistics(model),
        data,
    ), per_sample


REFERENCES = {"levels": 0, "one_batch": 2**40}
"""The budget of the run the subset is compared with: 0, level by level; or one large enough
that the data run as one batch (3 passes, within float32 rounding of the levels: a cheaper
reference for deep models)."""


def compare(case: str, count: int = 256, share: int = 8, against: str = "levels") -> str:
    """One line: the levels (or, ``against="one_batch"``, the one batch) against the subset on
    ``case`` (``count`` batches), the budget a ``1 / share`` of the data's largest BN
    input."""
    if case in APPLICATIONS:
        (run, statistics, data), per_sample = application(case, count)
    else:
        run, statistics, data = runner(case, count)
        per_sample = BN_BYTES_PER_SAMPLE.get(case, 64 * 4)
    samples = sum(len(batch) for batch in data)
    budget = samples * per_sample // share
    saved = _one_batch.ONE_BATCH_BYTES
    try:
        _one_batch.ONE_BATCH_BYTES = REFERENCES[against]
        levels = timed(run, data)
        by_levels = statistics()
        _one_batch.ONE_BATCH_BYTES = budget
        with SubsetForwards() as forwards:
            subset = timed(run, data)
    finally:
        _one_batch.ONE_BATCH_BYTES = saved
    worst = worst_difference(statistics(), by_levels)
    return (
        f"{case:10s} {len(by_levels):2d} BN layers, {samples} samples, {samples // share} fit  "
        f"{against.replace('_', ' ')} {levels[0]:2d} passes {levels[1]:6.1f} s CPU "
        f"{levels[2]:5.1f} s wall  "
        f"subset {subset[0]:2d} + {forwards.count:2d} subset {subset[1]:6.1f} s CPU "
        f"{subset[2]:5.1f} s wall  {levels[1] / subset[1]:4.1f}x CPU  "
        f"worst difference {worst:.1e}"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--count", type=int, default=256, help="batches")
    parser.add_argument("--share", type=int, default=8, help="data over the budget")
    parser.add_argument("--against", choices=sorted(REFERENCES), default="levels")
    args = parser.parse_args(argv)
    for case in cases_from(args.cases, [*CASES, *APPLICATIONS]):
        print(compare(case, args.count, args.share, args.against), flush=True)


if __name__ == "__main__":
    main()
