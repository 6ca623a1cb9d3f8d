"""benchmarks/eval_one_batch.py on a small case: its line says what it measured, the one
batch's three passes against the whole passes of the same data over the budget."""

from __future__ import annotations

import pytest
import torch

from benchmarks import eval_one_batch
from bnstats import _one_batch
from tests.torch import eval_models


def test_the_line_compares_the_one_batch_with_the_data_over_the_budget():
    model, data = eval_models.build("chain"), eval_models.batches("chain", 4, 16)
    line = eval_one_batch.compare("chain", model, data)
    assert "eval_exact  31 passes" in line and "without one batch 31 +" in line
    assert "one batch  3 +   0" in line and "largest BN input   0.0 MiB" in line
    assert _one_batch.ONE_BATCH_BYTES == 256 * 2**20  # put back after the run without it


def test_the_largest_input_is_the_largest_bn_input_over_all_the_data():
    model = eval_models.build("convchain")
    data = eval_models.batches("convchain", 4, 16)  # 64 samples of 8 channels 8x8
    assert eval_one_batch.largest_input_mib(model, data) == pytest.approx(64 * 512 * 4 / 2**20)


def test_an_unknown_case_is_refused():
    with pytest.raises(SystemExit, match="unknown case"):
        list(eval_one_batch.cases(["tiny"]))


def test_peak_growth_is_measured_or_nan():
    result, seconds, grown = eval_one_batch.timed_peak(lambda: torch.zeros(1))
    assert seconds >= 0 and (grown >= 0 or grown != grown)
