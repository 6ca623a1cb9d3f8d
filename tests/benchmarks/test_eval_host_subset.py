"""benchmarks/eval_host_subset.py on 512 images, half of them fitting the budget: its line says
what it measured, the subset's passes against the levels' on the same model and data.
Torch-free (Keras and Flax): ``python tests/run_torch_free.py`` runs it."""

from __future__ import annotations

import re

import pytest

from tests.optional import optional_import
from tests.torch_free import torch_free

optional_import("keras")
optional_import("flax")

from benchmarks import eval_host_subset  # noqa: E402
from bnstats import _host_one_batch, _one_batch  # noqa: E402


@pytest.fixture(autouse=True)
def _torch_free():
    yield from torch_free()


@pytest.mark.parametrize("case", ["keras_conv", "nnx_conv"])
def test_the_line_compares_the_subset_with_the_levels(case):
    line = eval_host_subset.compare(case, count=32, share=2)
    assert "10 BN layers, 512 samples, 256 fit  levels 11 passes" in line
    passes, forwards = map(int, re.search(r"subset +(\d+) \+ +(\d+) subset", line).groups())
    assert 2 <= passes < 11 and forwards >= 1
    worst = float(re.search(r"worst difference (\S+)", line).group(1))
    assert 0 <= worst < 1e-4
    assert _one_batch.ONE_BATCH_BYTES == 256 * 2**20  # put back after both runs
    assert _host_one_batch.iterate_on_subset is eval_host_subset.SubsetForwards()._iterate


def test_the_subset_can_be_compared_with_the_one_batch():
    """The cheaper reference for deep models: all the data as one batch (the first pass, the
    check pass), within float32 rounding of the levels."""
    line = eval_host_subset.compare("keras_conv", count=32, share=2, against="one_batch")
    assert "512 samples, 256 fit  one batch  2 passes" in line
    assert float(re.search(r"worst difference (\S+)", line).group(1)) < 1e-4
    assert _one_batch.ONE_BATCH_BYTES == 256 * 2**20


def test_an_unknown_case_is_refused():
    with pytest.raises(SystemExit, match="unknown case"):
        eval_host_subset.main(["--cases", "tiny"])


def test_an_application_sizes_its_budget_by_its_largest_bn_input():
    """keras.applications' MobileNetV2 on 32x32 images: its largest BN input is the first
    expansion's, 16 x 16 x 96 values of 4 bytes per image (the first pass measured 24 MiB
    over 256 images)."""
    (run, statistics, data), per_sample = eval_host_subset.application("keras_mobilenet_v2", 2)
    assert per_sample == 16 * 16 * 96 * 4
    assert [batch.shape for batch in data] == [(8, 32, 32, 3)] * 2
    assert len(statistics()) == 52  # every BN layer of the model
