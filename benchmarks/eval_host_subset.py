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

Run: ``KERAS_BACKEND=jax PYTHONPATH=src:. python -m benchmarks.eval_host_subset`` (about two
minutes); ``--cases keras_conv,nnx_conv,keras_mlp`` picks some, ``--count`` sets the batches,
``--share`` the data's size over the budget.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from benchmarks.eval_host_one_batch import runner, timed, worst_difference
from bnstats import _host_one_batch, _one_batch

os.environ.setdefault("KERAS_BACKEND", "jax")

CASES = ("keras_conv", "nnx_conv", "keras_mlp")

BN_BYTES_PER_SAMPLE = {"keras_conv": 16 * 16 * 16 * 4, "nnx_conv": 16 * 16 * 16 * 4}
"""Each case's largest BN input per sample (values of 4 bytes); the MLPs': 64 values."""


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


def compare(case: str, count: int = 256, share: int = 8) -> str:
    """One line: the levels against the subset on ``case`` (``count`` batches), the budget a
    ``1 / share`` of the data's largest BN input."""
    run, statistics, data = runner(case, count)
    samples = sum(len(batch) for batch in data)
    budget = samples * BN_BYTES_PER_SAMPLE.get(case, 64 * 4) // share
    saved = _one_batch.ONE_BATCH_BYTES
    try:
        _one_batch.ONE_BATCH_BYTES = 0
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
        f"levels {levels[0]:2d} passes {levels[1]:6.1f} s CPU {levels[2]:5.1f} s wall  "
        f"subset {subset[0]:2d} + {forwards.count:2d} subset {subset[1]:6.1f} s CPU "
        f"{subset[2]:5.1f} s wall  {levels[1] / subset[1]:4.1f}x CPU  "
        f"worst difference {worst:.1e}"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--count", type=int, default=256, help="batches")
    parser.add_argument("--share", type=int, default=8, help="data over the budget")
    args = parser.parse_args(argv)
    for case in args.cases.split(","):
        if case not in CASES:
            raise SystemExit(f"unknown case {case!r}; choose from {', '.join(CASES)}")
        print(compare(case, args.count, args.share), flush=True)


if __name__ == "__main__":
    main()
