"""benchmarks/eval_host_one_batch.py on 4 batches: its line says what it measured, the one
batch's passes against the levels' on the same model and data. Torch-free (Keras and Flax):
``python tests/run_torch_free.py`` runs it."""

from __future__ import annotations

import re

import numpy as np
import pytest

from tests.optional import optional_import
from tests.torch_free import torch_free

optional_import("keras")
optional_import("flax")

from benchmarks import eval_host_one_batch  # noqa: E402
from bnstats import _one_batch  # noqa: E402


@pytest.fixture(autouse=True)
def _torch_free():
    yield from torch_free()


@pytest.mark.parametrize(("case", "layers"), [("keras_conv", 10), ("nnx_mlp", 30)])
def test_the_line_compares_the_one_batch_with_the_levels(case, layers):
    line = eval_host_one_batch.compare(case, count=4)
    assert f"{layers} BN layers  levels {layers + 1} passes" in line
    assert "one batch  2 + 1" in line
    worst = float(re.search(r"worst difference (\S+)", line).group(1))
    assert 0 <= worst < 1e-4
    assert _one_batch.ONE_BATCH_BYTES == 256 * 2**20  # put back after the levels


def test_the_worst_difference_is_relative_to_the_spread():
    mean, var = np.array([1.0, 2.0]), np.array([4.0, 1.0])
    moved_mean = eval_host_one_batch.worst_difference([(mean + [0.2, 0], var)], [(mean, var)])
    assert moved_mean == pytest.approx(0.1)
    assert eval_host_one_batch.worst_difference([(mean, var * 1.5)], [(mean, var)]) == 0.5


def test_an_unknown_case_is_refused():
    with pytest.raises(SystemExit, match="unknown case"):
        eval_host_one_batch.main(["--cases", "tiny"])
