"""bnstats._host_one_batch through the NumPy-only fake framework of tests/test_host_pass.py
(``recalibrate(..., mode="eval", one_batch=True)``, as bnstats.keras and bnstats.flax run
it): three passes where the data fit, the exact level-by-level numbers, and the levels
wherever the one batch cannot stand in for them."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from bnstats import _one_batch
from tests.test_host_pass import assert_population, chain, data, eval_reference, recalibrate

DEEP = ["W1", "a", "relu", "W2", "b", "relu", "W2", "c", "relu", "W2", "d"]
"""Four BN layers, one per depth level: five passes level by level."""


def deep(rng: np.random.Generator):
    return chain(rng, DEEP)


def assert_exact(net, batches: list[np.ndarray], passes: int, **options) -> None:
    """``mode="eval"`` with the one batch on takes ``passes`` and gives the level-by-level
    numbers."""
    measured = recalibrate(net, batches, mode="eval", one_batch=True, **options)
    assert measured.passes == passes
    for name, values in eval_reference(net, batches).items():
        assert_population(measured.layers[name], values)


def test_the_one_batch_reaches_the_level_by_level_numbers_in_three_passes(rng):
    net, batches = deep(rng), data(rng, [1, 4, 1, 4, 1])  # batches of one sample too
    measured = recalibrate(net, batches, mode="eval", one_batch=True)
    assert measured.passes == 3
    assert net.forwards == len(batches) + 1 + len(batches)  # pass 1, the one batch, the check
    for name, values in eval_reference(net, batches).items():
        assert_population(measured.layers[name], values)
    assert measured.batch_sizes == [1, 4, 1, 4, 1]
    levels = recalibrate(deep(rng), batches, mode="eval")
    assert levels.passes == 5


def test_the_budget_is_the_largest_bn_input(rng, monkeypatch):
    """11 samples of 4 channels, 4 bytes a value: 176 bytes (the float32 inputs: 132)."""
    batches = [batch.astype(np.float32) for batch in data(rng, [5, 6])]
    monkeypatch.setattr(_one_batch, "ONE_BATCH_BYTES", 11 * 4 * 4)
    assert recalibrate(deep(rng), batches, mode="eval", one_batch=True).passes == 3
    monkeypatch.setattr(_one_batch, "ONE_BATCH_BYTES", 11 * 4 * 4 - 1)
    net = deep(rng)
    measured = recalibrate(net, batches, mode="eval", one_batch=True)
    assert measured.passes == 5 and net.forwards == 5 * len(batches)
    for name, values in eval_reference(net, batches).items():
        assert_population(measured.layers[name], values)


def test_inputs_over_the_budget_are_not_kept(rng):
    """11 samples: BN inputs of 176 bytes (4 channels of 4 bytes), float64 inputs of 264
    (3 values of 8 bytes): at 200 bytes the BN inputs fit but the inputs are not kept."""
    batches = data(rng, [5, 6])
    for limit, passes in ((200, 5), (264, 3)):
        measured = recalibrate(
            deep(rng), batches, mode="eval", one_batch=True, one_batch_bytes=limit
        )
        assert measured.passes == passes


def test_batches_that_do_not_join_take_the_levels(rng):
    net, batches = deep(rng), data(rng, [4, 4, 4])
    batches[1] = batches[1].astype(np.float32)  # another dtype
    assert_exact(net, batches, 5)


def test_a_model_that_mixes_its_samples_is_caught_by_the_check_pass(rng):
    """A step that centres each batch on its own mean: the one batch is not the same data, so
    its check pass moves the statistics and the levels go on (5 passes after the 2 it
    spent), to the same numbers as the levels alone."""
    net = deep(rng)
    net.steps.insert(1, lambda x: x - x.mean(axis=0) * 0.5)
    batches = data(rng, [3, 5, 4])
    assert_exact(net, batches, 5 + 2)


def at_most(samples: int) -> Callable[[np.ndarray], np.ndarray]:
    """A step of a model written for batches of at most ``samples`` samples: larger raise."""

    def step(x: np.ndarray) -> np.ndarray:
        if len(x) > samples:
            raise RuntimeError(f"a batch of more than {samples}")
        return x

    return step


def test_a_failing_one_batch_forward_takes_the_levels(rng):
    """A model written for batches of at most 6 samples: its one-batch forward raises, the
    levels run, the model's error is never shown."""

    net = deep(rng)
    net.steps.insert(0, at_most(6))
    batches = data(rng, [4, 6, 2])
    assert_exact(net, batches, 5 + 1)


def test_a_bad_batch_takes_the_levels_and_keeps_their_errors(rng):
    net, batches = deep(rng), data(rng, [4, 4, 4])
    batches[1][0, 0] = np.nan
    with pytest.raises(ValueError, match="BN layer 'a': 1 of 3 batches"):
        recalibrate(net, batches, mode="eval", one_batch=True)
    measured = recalibrate(net, batches, mode="eval", one_batch=True, nonfinite="skip")
    assert measured.passes == 5 + 1  # the one batch's forward was not finite
    for name, values in eval_reference(net, [batches[0], batches[2]]).items():
        assert_population(measured.layers[name], values)


def test_max_samples_cuts_the_one_batch_where_it_cuts_the_passes(rng):
    net, batches = deep(rng), data(rng, [4, 4, 4])
    measured = recalibrate(net, batches, mode="eval", one_batch=True, max_samples=6)
    assert measured.passes == 3 and measured.batch_sizes == [4, 2]
    for name, values in eval_reference(net, [batches[0], batches[1][:2]]).items():
        assert_population(measured.layers[name], values)


def test_a_layer_called_twice_keeps_the_levels_error(rng):
    net = chain(rng, ["W1", "a", "relu", "W2", "b", "relu", "a"])
    with pytest.raises(ValueError, match="'a' is called 2 times per forward"):
        recalibrate(net, data(rng, [4, 4]), mode="eval", one_batch=True)


def test_one_level_needs_no_one_batch(rng):
    """Layers all settled by the first pass: the check pass alone follows (2 passes)."""
    net, batches = chain(rng, ["W1", "a"]), data(rng, [4, 4])
    assert recalibrate(net, batches, mode="eval", one_batch=True).passes == 2
    assert net.forwards == 2 * len(batches)
