"""benchmarks/eval_grown_subset.py on a small case: its line says what each run measured, and
switching the growth off for the comparison leaves the library's setting as it was."""

from __future__ import annotations

import pytest

pytest.importorskip("torch")

from benchmarks import eval_grown_subset  # noqa: E402
from bnstats.torch import _subset_choice  # noqa: E402
from tests.torch import eval_models  # noqa: E402


@pytest.mark.parametrize("given", [list, eval_models.Unsized])
def test_the_line_compares_the_subset_sized_and_not(monkeypatch, given):
    """As a list (the subset drawn first) and without a length (the batch-statistics pass
    first), the subset of 4 batches grows to 8."""
    monkeypatch.setattr(_subset_choice, "SUBSET_SAMPLES", 64)
    monkeypatch.setattr(_subset_choice, "SUBSET_SHARE", 16)
    model = eval_models.build("residual")
    data = given(eval_models.batches("residual", 64, 16))
    line = eval_grown_subset.compare("residual", model, data, 2**20, exact=True)

    before, sized = line.split(" | ")[:2]
    assert "over   4 batches" in before and "over   8 batches" in sized
    one_batch = "(one batch: 2 + 1)" if given is list else "(one batch: 3 + 0)"
    assert "faster" in line and "from exact" in line and one_batch in line
    assert (_subset_choice.GROWN_LEAST, _subset_choice.SHRUNK_LEAST) == (1.5, 256)
