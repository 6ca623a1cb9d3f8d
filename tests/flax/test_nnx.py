"""bnstats.flax.recalibrate_nnx against an independent float64 computation."""

from __future__ import annotations

import numpy as np
import pytest

from tests.optional import optional_import

optional_import("flax")  # skipped without it (fails under BNSTATS_REQUIRE_EXTRAS=1)

from bnstats.flax import recalibrate_nnx  # noqa: E402
from tests.counted import Counted  # noqa: E402
from tests.flax.models import assert_close, batches, f64, net, nnx, population  # noqa: E402

UNEVEN = [5, 12, 5, 3, 12]  # uneven, with few distinct shapes (one compilation each on JAX)


def _leaves(tree):
    """Every parameter and statistic of a model or state (the rng keys left out)."""
    import jax

    if isinstance(tree, nnx.Module):
        tree = nnx.state(tree, nnx.Any(nnx.Param, nnx.BatchStat))
    return [np.array(leaf) for leaf in jax.tree.leaves(tree)]


def test_train_mode_gives_the_population_statistics_and_keeps_the_mode(rng):
    model = net(rng)
    model.eval()
    data = batches(rng, UNEVEN, (6,))
    recalibrate_nnx(model, data, progress=False)
    collected = [model.inputs(f64(x), None) for x in data]
    for i, bn in enumerate(model.batchnorms()):
        assert_close(bn.mean[...], bn.var[...], population([c[i] for c in collected]))
        assert bn.use_running_average is True
    assert model.drop.deterministic is True
    model.train()
    recalibrate_nnx(model, [(x, np.zeros(len(x))) for x in data])
    assert model.bn.use_running_average is False and model.drop.deterministic is False
    for i, bn in enumerate(model.batchnorms()):
        assert_close(bn.mean[...], bn.var[...], population([c[i] for c in collected]))


def test_eval_mode_with_batches_of_one(rng):
    model = net(rng)
    data = batches(rng, [1, 3, 1, 3], (6,))
    recalibrate_nnx(model, data, mode="eval")
    x = np.concatenate(data).astype(np.float64)
    stats: list = [None, None, None]
    for i, bn in enumerate(model.batchnorms()):
        stats[i] = population([model.inputs(x, [s or (np.nan, np.nan) for s in stats])[i]])
        assert_close(bn.mean[...], bn.var[...], stats[i])


@pytest.mark.parametrize("budget", [None, 0], ids=["one_batch", "levels"])
def test_eval_mode_runs_data_that_fit_as_one_batch(rng, budget):
    """The first pass, the one batch, the check: the data gone over twice (level by level,
    with a budget of 0: four times), to the same numbers."""
    model = net(rng)
    data = Counted(batches(rng, [2, 5, 1, 4], (6,)))
    recalibrate_nnx(model, data, mode="eval", one_batch_bytes=budget)
    assert data.drawn == (2 if budget is None else 4)
    x = np.concatenate(data).astype(np.float64)
    stats: list = [None, None, None]
    for i, bn in enumerate(model.batchnorms()):
        stats[i] = population([model.inputs(x, [s or (np.nan, np.nan) for s in stats])[i]])
        assert_close(bn.mean[...], bn.var[...], stats[i])


class _ConvChain(nnx.Module):
    """Six blocks of Conv(8, 3x3) + BatchNorm + relu on 8x8x3 images (NHWC): one BN layer per
    depth level, 8 x 8 x 8 values of 4 bytes per image in each."""

    def __init__(self, rng: np.random.Generator) -> None:
        rngs = nnx.Rngs(0)
        self.convs = nnx.List(
            [nnx.Conv(3 if i == 0 else 8, 8, (3, 3), rngs=rngs) for i in range(6)]
        )
        self.norms = nnx.List([nnx.BatchNorm(8, rngs=rngs) for _ in range(6)])
        for norm in self.norms:
            norm.scale[...] = rng.uniform(0.5, 2.0, 8).astype("float32")
            norm.bias[...] = rng.normal(size=8).astype("float32")

    def __call__(self, x):
        for conv, norm in zip(self.convs, self.norms, strict=True):
            x = nnx.relu(norm(conv(x)))
        return x


@pytest.mark.parametrize("jit", [True, False], ids=["jit", "eager"])
def test_eval_mode_over_the_budget_solves_on_the_first_batches(rng, jit):
    """1,024 images over a budget of 256: the first 16 batches are the subset
    (bnstats._host_subset). 4 passes over the data and 5 forwards of the subset, where the
    levels take 7, to their numbers within 1e-4 (float32 rounding apart)."""
    model = _ConvChain(rng)
    data = Counted([rng.normal(1.0, 2.0, (16, 8, 8, 3)).astype("float32") for _ in range(64)])
    recalibrate_nnx(model, data, mode="eval", one_batch_bytes=0, jit=jit)
    levels = [(f64(norm.mean[...]), f64(norm.var[...])) for norm in model.norms]
    assert data.drawn == 7
    data.drawn = 0
    recalibrate_nnx(model, data, mode="eval", one_batch_bytes=256 * 8 * 8 * 8 * 4, jit=jit)
    assert data.drawn == 4
    for norm, (mean, var) in zip(model.norms, levels, strict=True):
        assert np.max(np.abs(f64(norm.mean[...]) - mean) / np.sqrt(var)) < 1e-4
        assert np.max(np.abs(f64(norm.var[...]) - var) / var) < 1e-4


def test_eval_mode_refuses_a_one_shot_iterator_before_any_pass(rng):
    model = net(rng)
    before = _leaves(model)
    data = batches(rng, [4, 4], (6,))
    with pytest.raises(TypeError, match="mode='eval' passes over batches several times"):
        recalibrate_nnx(model, iter(data), mode="eval")
    for a, b in zip(before, _leaves(model), strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_data_source_that_raises_midway_writes_nothing(rng):
    model = net(rng)
    before = _leaves(model)

    def failing():
        yield from batches(rng, [4, 4], (6,))
        raise RuntimeError("the data source failed")

    with pytest.raises(RuntimeError, match="the data source failed"):
        recalibrate_nnx(model, failing())
    for a, b in zip(before, _leaves(model), strict=True):
        np.testing.assert_array_equal(a, b)


def test_only_the_statistics_change(rng):
    model = net(rng)
    bns = model.batchnorms()
    params = _leaves(nnx.state(model, nnx.Param))
    recalibrate_nnx(model, batches(rng, [8, 8], (6,)), forward=lambda m, x: m(x))
    for a, b in zip(params, _leaves(nnx.state(model, nnx.Param)), strict=True):
        np.testing.assert_array_equal(a, b)
    assert [bn.momentum for bn in bns] == [0.99, 0.9, 0.99]


class _Rematerialized(nnx.Module):
    def __init__(self, rngs):
        self.linear = nnx.Linear(6, 4, rngs=rngs)
        self.bn = nnx.BatchNorm(4, rngs=rngs)

    def __call__(self, x):
        return nnx.remat(lambda model, h: model.bn(model.linear(h)))(self, x)


@pytest.mark.parametrize("jit", [True, False])
def test_a_layer_copied_by_a_transform_is_refused_and_nothing_written(rng, jit):
    model = _Rematerialized(nnx.Rngs(0))
    mean = np.array(model.bn.mean[...])
    with pytest.raises(ValueError, match=r"not one of the model's layers.*nnx.remat"):
        recalibrate_nnx(model, batches(rng, [4, 4], (6,)), jit=jit, unreached="keep")
    np.testing.assert_array_equal(np.array(model.bn.mean[...]), mean)
