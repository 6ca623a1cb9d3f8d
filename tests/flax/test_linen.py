"""bnstats.flax.recalibrate_linen against an independent float64 computation."""

from __future__ import annotations

import numpy as np
import pytest

from tests.optional import optional_import

optional_import("flax")  # skipped without it (fails under BNSTATS_REQUIRE_EXTRAS=1)

from bnstats.flax import recalibrate_linen  # noqa: E402
from tests.flax.models import (  # noqa: E402
    LinenNet,
    assert_close,
    batches,
    f64,
    jax,
    linen_inputs,
    nn,
    population,
)


def _init(rng, keywords=False):
    module = LinenNet(keywords=keywords)
    variables = module.init(jax.random.key(0), np.zeros((2, 3, 6), "float32"), train=False)
    stats = jax.tree.map(
        lambda a: np.asarray(rng.uniform(0.5, 2.0, a.shape), a.dtype), variables["batch_stats"]
    )
    return module, {**variables, "batch_stats": stats}


@pytest.mark.parametrize("keywords", [False, True])
def test_new_variables_hold_the_population_statistics_and_the_old_ones_are_unchanged(rng, keywords):
    module, variables = _init(rng, keywords)
    before = [np.array(leaf) for leaf in jax.tree.leaves(variables)]
    data = batches(rng, [5, 12, 5, 3], (3, 6))
    new = recalibrate_linen(module, variables, data, train=True)
    collected = [linen_inputs(variables, f64(x)) for x in data]
    for i, name in enumerate(["bn0", "bn1"]):
        entry = new["batch_stats"][name]
        assert_close(entry["mean"], entry["var"], population([c[i] for c in collected]))
    for a, b in zip(before, jax.tree.leaves(variables), strict=True):
        np.testing.assert_array_equal(a, np.array(b))
    assert new["params"] is variables["params"]


def test_apply_arguments_that_leave_batch_norm_in_inference_raise(rng):
    module, variables = _init(rng)
    with pytest.raises(ValueError, match="bn0.*use_running_average=True"):
        recalibrate_linen(module, variables, batches(rng, [4], (3, 6)), train=False)


def test_a_data_source_that_raises_midway_returns_nothing(rng):
    module, variables = _init(rng)

    def failing():
        yield from batches(rng, [4, 4], (3, 6))
        raise RuntimeError("the data source failed")

    with pytest.raises(RuntimeError, match="the data source failed"):
        recalibrate_linen(module, variables, failing(), train=True)


class _Rematerialized(nn.Module):
    @nn.compact
    def __call__(self, x, train):
        return nn.remat(nn.BatchNorm)(use_running_average=not train)(nn.Dense(4)(x))


@pytest.mark.parametrize("jit", [True, False])
def test_a_batch_norm_inside_a_lifted_transform_is_refused_by_name(rng, jit):
    module = _Rematerialized()
    variables = module.init(jax.random.key(0), np.zeros((2, 6), "float32"), train=False)
    with pytest.raises(ValueError, match=r"lifted transforms \(nn.remat"):
        recalibrate_linen(module, variables, batches(rng, [4, 4], (6,)), train=True, jit=jit)
