"""The small-batches benchmark's pieces: its two kinds of batches, and a tiny grid end to end
(the full run lives in benchmarks/, not in the tests)."""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from bnstats.data import Dataset, load_digits

PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "small_batches.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("small_batches", PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["small_batches"] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("small_batches", None)


def test_iid_batches_are_one_pass_of_equal_batches(bench):
    y = np.arange(103) % 10
    batches = list(bench.iid_batches(y, 8, np.random.default_rng(0)))
    assert len(batches) == 12 and {len(b) for b in batches} == {8}
    rows = np.concatenate(batches)
    assert len(np.unique(rows)) == 96


@pytest.mark.parametrize("k", [2, 4, 32])
def test_two_class_batches_hold_half_of_each_of_two_classes(bench, k):
    y = np.repeat(np.arange(10), 40)
    batches = list(bench.two_class_batches(y, k, np.random.default_rng(1)))
    assert len(batches) == len(y) // k
    for rows in batches:
        labels, counts = np.unique(y[rows], return_counts=True)
        assert len(labels) == 2 and list(counts) == [k // 2, k // 2]
        assert len(np.unique(rows)) == k
    with pytest.raises(ValueError, match="even batch size"):
        next(bench.two_class_batches(y, 3, np.random.default_rng(1)))


def test_tiny_grid_end_to_end(bench):
    pytest.importorskip("torch")
    config = replace(bench.QUICK, sizes=(8,), engine_epochs=2, torch_epochs=2, ghost_batch=32)
    digits = load_digits(seed=0)
    data = Dataset(
        "digits", digits.X_train[:320], digits.y_train[:320], digits.X_test, digits.y_test
    )
    records = bench.run_grid(config, data)
    assert len(records) == 2 * 2 * 3
    for r in records:
        assert 0.0 <= r["accuracy"] <= 1.0
        if r["mode"] == "iid" and r["norm"] != "ghost":
            assert r["accuracy"] > 0.5, r  # well above the 0.1 of chance
    table = bench.markdown_tables(bench.summarize(records), config)
    assert table.count("| renorm |") == 4 and "torch, two-class batches" in table
