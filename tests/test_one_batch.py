"""bnstats._one_batch with NumPy arrays: how batches join into eval mode's one batch and what
the first pass keeps for it (the torch kind: tests/torch/test_one_batch.py)."""

from __future__ import annotations

from collections import namedtuple

import numpy as np
import pytest

from bnstats import _one_batch
from bnstats._host_one_batch import host_arrays
from bnstats._one_batch import CannotJoin, KeptBatches, array_bytes, join, join_or_none

ARRAYS = host_arrays(np.concatenate)
Pair = namedtuple("Pair", "x y")


def test_arrays_join_along_the_first_dimension_inside_any_structure():
    a, b = np.arange(6.0).reshape(2, 3), np.arange(3.0).reshape(1, 3)
    joined = join([(a, [a], {"x": a, "k": 3}), (b, [b], {"x": b, "k": 3})], ARRAYS)
    np.testing.assert_array_equal(joined[0], np.concatenate([a, b]))
    np.testing.assert_array_equal(joined[1][0], np.concatenate([a, b]))
    assert isinstance(joined[1], list) and joined[2]["k"] == 3
    named = join([Pair(a, a[:, 0]), Pair(b, b[:, 0])], ARRAYS)
    assert isinstance(named, Pair) and named.y.shape == (3,)


@pytest.mark.parametrize(
    "second",
    [
        np.zeros((2, 4)),  # another trailing shape
        np.zeros((2, 3), np.float32),  # another dtype
        np.float64(1.0),  # no first dimension
        [np.zeros((2, 3))],  # another structure
    ],
    ids=["shape", "dtype", "scalar", "structure"],
)
def test_unlike_batches_do_not_join(second):
    with pytest.raises(CannotJoin):
        join([np.zeros((2, 3)), second], ARRAYS)
    assert join_or_none([np.zeros((2, 3)), second], ARRAYS) is None


def test_other_parts_join_only_where_equal():
    a = np.zeros((2, 3))
    assert join([(a, "mean"), (a, "mean")], ARRAYS)[1] == "mean"
    assert join_or_none([(a, "mean"), (a, "sum")], ARRAYS) is None
    assert join_or_none([(a, object()), (a, object())], ARRAYS) is None
    assert join_or_none([], ARRAYS) is None


def test_the_first_pass_keeps_its_batches_within_the_budget():
    batches = [(np.zeros((2, 3)), {"y": np.zeros(2)})] * 3  # 64 bytes each
    assert array_bytes(batches[0], ARRAYS) == 64
    kept = KeptBatches(batches, ARRAYS, 192)
    assert list(kept) == batches and kept.kept == batches
    kept = KeptBatches(batches, ARRAYS, 191)
    assert list(kept) == batches and kept.kept is None  # every batch still given
    assert kept.first == []  # nothing held past the budget


def test_the_first_batches_within_the_budget_stay_kept_where_asked():
    """Eval mode's subset (bnstats._host_subset): the first batches within the budget, also
    where the rest are over it, and also where the pass stops early."""
    batches = [np.zeros((2, 4))] * 5  # 64 bytes each
    kept = KeptBatches(batches, ARRAYS, 191, keep_first=True)
    assert list(kept) == batches and kept.kept is None and kept.first == batches[:2]
    kept = KeptBatches(batches, ARRAYS, 320, keep_first=True)
    assert list(kept) == batches and kept.kept == kept.first == batches
    drawn = iter(kept)
    next(drawn)
    assert kept.first == batches[:1] == kept.kept  # a pass cut short (max_samples)


def test_the_budget_is_the_given_one_or_the_default(monkeypatch):
    assert _one_batch.budget(None) == 256 * 2**20 and _one_batch.budget(0) == 0
    monkeypatch.setattr(_one_batch, "ONE_BATCH_BYTES", 5)  # read at each call
    assert _one_batch.budget(None) == 5 and _one_batch.budget(2**40) == 2**40
    for bad in (-1, 1.5, "1", True):
        with pytest.raises(ValueError, match="one_batch_bytes must be a number of bytes"):
            _one_batch.check_budget(bad)
    _one_batch.check_budget(np.int64(7))
