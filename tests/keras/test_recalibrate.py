"""bnstats.keras.recalibrate against an independent float64 computation of every BN layer's
input, on the backend KERAS_BACKEND names (JAX and NumPy in CI)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from tests.optional import optional_import

optional_import("keras")  # skipped without it (fails under BNSTATS_REQUIRE_EXTRAS=1)

from bnstats.keras import recalibrate  # noqa: E402
from bnstats.keras._layers import find_batchnorm_layers  # noqa: E402
from tests.counted import Counted  # noqa: E402
from tests.keras.models import (  # noqa: E402
    CASES,
    assert_statistics,
    data_for,
    eval_reference,
    keras,
    randomize,
    snapshot,
    train_reference,
)

UNEVEN = [5, 12, 5, 3, 12]  # uneven, with few distinct shapes (one compilation each on JAX)


@pytest.mark.parametrize("name", sorted(CASES))
def test_train_mode_gives_the_population_statistics_of_every_layer(name, rng):
    case = CASES[name](rng)
    batches = data_for(case, rng, UNEVEN)
    momenta = [bn.momentum for bn in case.bns]
    before = snapshot(case.model)
    assert recalibrate(case.model, batches, progress=False) is case.model
    for bn, expected in zip(case.bns, train_reference(case, batches), strict=True):
        assert_statistics(bn, expected)
    changed = {id(v) for bn in case.bns for v in (bn.moving_mean, bn.moving_variance)}
    for variable, old in zip(case.model.weights, before, strict=True):
        if id(variable) not in changed:
            np.testing.assert_array_equal(keras.ops.convert_to_numpy(variable), old)
    assert [bn.momentum for bn in case.bns] == momenta
    assert all(bn.trainable for bn in case.bns)


@pytest.mark.parametrize("name", sorted(CASES))
def test_eval_mode_gives_the_statistics_inference_sees_with_batches_of_one(name, rng):
    case = CASES[name](rng)
    batches = data_for(case, rng, [1, 4, 1, 4, 1])
    recalibrate(case.model, batches, mode="eval", progress=False)
    for bn, expected in zip(case.bns, eval_reference(case, batches), strict=True):
        assert_statistics(bn, expected)


@pytest.mark.parametrize("name", sorted(CASES))
def test_eval_mode_runs_data_that_fit_as_one_batch(name, rng, monkeypatch):
    """Three passes (the first, the one batch, the check), the data gone over twice, the
    level-by-level numbers; with the one batch off (a budget of 0) the levels take more."""
    from bnstats import _one_batch
    from bnstats.keras._pass import KerasPassOptions, measure

    case = CASES[name](rng)
    batches = Counted(data_for(case, rng, [1, 4, 1, 4, 1]))
    options = KerasPassOptions(mode="eval", progress=False)
    assert measure(case.model, batches, options).measured.passes == 3 and batches.drawn == 2
    recalibrate(case.model, batches, mode="eval", progress=False)
    for bn, expected in zip(case.bns, eval_reference(case, batches), strict=True):
        assert_statistics(bn, expected)
    levels = KerasPassOptions(mode="eval", progress=False, one_batch_bytes=0)
    assert measure(case.model, batches, levels).measured.passes == len(case.bns) + 1
    monkeypatch.setattr(_one_batch, "ONE_BATCH_BYTES", 0)  # the default budget
    assert measure(case.model, batches, options).measured.passes == len(case.bns) + 1
    with pytest.raises(ValueError, match="one_batch_bytes must be a number of bytes"):
        recalibrate(case.model, batches, mode="eval", one_batch_bytes=-1)


def conv_chain(rng: np.random.Generator, blocks: int) -> Any:
    """``blocks`` of Conv2D(8, 3x3) + BN + ReLU on 8x8x3 images: one BN layer per depth level,
    8 x 8 x 8 values of 4 bytes per image in each."""
    layers: list[Any] = [keras.Input((8, 8, 3))]
    for _ in range(blocks):
        layers += [
            keras.layers.Conv2D(8, 3, padding="same"),
            keras.layers.BatchNormalization(),
            keras.layers.ReLU(),
        ]
    model = keras.Sequential(layers)
    randomize(model, rng)
    return model


def test_eval_mode_over_the_budget_solves_on_the_first_batches(rng):
    """1,024 images over a budget of 256: the first 16 batches are the subset
    (bnstats._host_subset). 4 passes over the data and 5 forwards of the subset, where the
    levels take 7, to their numbers within 1e-4 (float32 rounding apart)."""
    from bnstats.keras._pass import KerasPassOptions, measure

    keras.utils.set_random_seed(0)
    model = conv_chain(rng, 6)
    batches = Counted([rng.normal(1.0, 2.0, (16, 8, 8, 3)).astype("float32") for _ in range(64)])
    budget = 256 * 8 * 8 * 8 * 4
    options = KerasPassOptions(mode="eval", progress=False, one_batch_bytes=budget)
    measured = measure(model, batches, options).measured
    assert (measured.passes, measured.subset_passes, batches.drawn) == (4, 5, 4)
    levels = measure(model, batches, KerasPassOptions(mode="eval", one_batch_bytes=0)).measured
    assert levels.passes == 7
    for name, host in levels.layers.items():
        mean, var = host.statistics()
        got_mean, got_var = measured.layers[name].statistics()
        assert np.max(np.abs(got_mean - mean) / np.sqrt(var)) < 1e-4
        assert np.max(np.abs(got_var - var) / var) < 1e-4
    recalibrate(model, batches, mode="eval", one_batch_bytes=budget, progress=False)
    for bn, name in zip(find_batchnorm_layers(model).values(), measured.layers, strict=True):
        np.testing.assert_allclose(
            keras.ops.convert_to_numpy(bn.moving_variance),
            measured.layers[name].statistics()[1],
            rtol=1e-6,
        )


def test_an_array_with_batch_size_and_tuples_with_targets_give_the_same_numbers(rng):
    case = CASES["mlp"](rng)
    x = data_for(case, rng, [50])[0]
    recalibrate(case.model, x, batch_size=16)
    from_array = snapshot(case.model)
    y = np.zeros(len(x))
    recalibrate(case.model, [(x[i : i + 16], y[i : i + 16]) for i in range(0, 50, 16)])
    for a, b in zip(from_array, snapshot(case.model), strict=True):
        np.testing.assert_array_equal(a, b)
    batches = [x[i : i + 16] for i in range(0, 50, 16)]
    for bn, expected in zip(case.bns, train_reference(case, batches), strict=True):
        assert_statistics(bn, expected)


def test_a_py_dataset_and_max_samples(rng):
    case = CASES["mlp"](rng)
    x = data_for(case, rng, [40])[0]

    class Batches(keras.utils.PyDataset):
        def __len__(self):
            return 4

        def __getitem__(self, index):
            return x[index * 10 : (index + 1) * 10], np.zeros(10)

    recalibrate(case.model, Batches(), max_samples=25)  # 10, 10, then 5 of the third
    batches = [x[:10], x[10:20], x[20:25]]
    for bn, expected in zip(case.bns, train_reference(case, batches), strict=True):
        assert_statistics(bn, expected)


def _failing(batches, after):
    for index, batch in enumerate(batches):
        if index == after:
            raise RuntimeError("the data source failed")
        yield batch


def test_a_data_source_that_raises_midway_writes_nothing(rng):
    case = CASES["subclassed"](rng)
    before = snapshot(case.model)
    with pytest.raises(RuntimeError, match="the data source failed"):
        recalibrate(case.model, _failing(data_for(case, rng, UNEVEN), after=3))
    for variable, old in zip(case.model.weights, before, strict=True):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(variable), old)


def test_a_model_that_raises_midway_writes_nothing_and_keeps_working(rng):
    case = CASES["mlp"](rng)
    batches = data_for(case, rng, UNEVEN)
    batches[2] = batches[2][:, :4]  # the wrong width: the model raises on the third batch
    before = snapshot(case.model)
    outputs = keras.ops.convert_to_numpy(case.model(batches[0], training=False))
    with pytest.raises(ValueError):
        recalibrate(case.model, batches)
    for variable, old in zip(case.model.weights, before, strict=True):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(variable), old)
    after = keras.ops.convert_to_numpy(case.model(batches[0], training=False))
    np.testing.assert_array_equal(after, outputs)


def bn_stats(bn):
    convert = keras.ops.convert_to_numpy
    return tuple(np.asarray(convert(v), np.float64) for v in (bn.moving_mean, bn.moving_variance))


def test_a_training_batch_of_one_names_the_layer(rng):
    case = CASES["mlp"](rng)
    with pytest.raises(ValueError, match=r"batch_normalization.*1 value per channel"):
        recalibrate(case.model, data_for(case, rng, [4, 1]))


def test_layers_of_the_same_path_each_get_their_own_statistics(rng):
    case = CASES["same_names"](rng)
    paths = list(find_batchnorm_layers(case.model))
    assert [path.split("/")[0] for path in paths] == ["block", "block#2", "block#3"]


def test_a_model_not_built_yet_is_built_by_the_pass(rng):
    dense, bn = keras.layers.Dense(4), keras.layers.BatchNormalization()
    model = keras.Sequential([dense, bn])
    batches = [rng.normal(2.0, 3.0, (n, 5)).astype("float32") for n in (8, 6, 8)]
    recalibrate(model, batches)
    kernel, bias = (np.asarray(keras.ops.convert_to_numpy(v), np.float64) for v in dense.weights)
    z = np.concatenate([x.astype(np.float64) @ kernel + bias for x in batches])
    assert_statistics(bn, (z.mean(0), z.var(0)))


def test_a_frozen_layer_keeps_its_statistics(rng):
    case = CASES["mlp"](rng)
    case.bns[0].trainable = False
    frozen = bn_stats(case.bns[0])
    batches = data_for(case, rng, UNEVEN)
    with pytest.warns(UserWarning, match=r"fixed statistics \(trainable=False\).*batch_norm"):
        recalibrate(case.model, batches)
    for a, b in zip(frozen, bn_stats(case.bns[0]), strict=True):
        np.testing.assert_array_equal(a, b)
    assert not case.bns[0].trainable
    collected = [case.inputs(x.astype(np.float64), [frozen])[1] for x in batches]
    values = np.concatenate(collected)
    assert_statistics(case.bns[1], (values.mean(0), values.var(0)))


def test_a_model_whose_layers_are_all_frozen_is_refused(rng):
    case = CASES["mlp"](rng)
    case.model.trainable = False
    before = snapshot(case.model)
    with pytest.raises(ValueError, match="every BN layer .* trainable=False"):
        recalibrate(case.model, data_for(case, rng, UNEVEN))
    for a, b in zip(before, snapshot(case.model), strict=True):
        np.testing.assert_array_equal(a, b)


def test_bad_arguments_get_one_clear_error(rng):
    case = CASES["mlp"](rng)
    x = data_for(case, rng, [10])[0]
    with pytest.raises(TypeError, match="batch_size"):
        recalibrate(case.model, x)
    with pytest.raises(ValueError, match="no batch"):
        recalibrate(case.model, [])
    with pytest.raises(ValueError, match="mode"):
        recalibrate(case.model, [x], mode="inference")
    with pytest.raises(TypeError, match="passes over data several times .* go over again"):
        recalibrate(case.model, iter([x]), mode="eval")
