"""benchmarks/eval_late_subset_ranks.py: its "by passes" way never joins a late subset and
leaves the library as it was, and its "joined" way joins it (one process, a small case)."""

from __future__ import annotations

import pytest

pytest.importorskip("torch")

from benchmarks import eval_late_subset_ranks  # noqa: E402
from bnstats.torch import _subset_iteration  # noqa: E402
from tests.torch import eval_models  # noqa: E402


def test_the_two_ways_solve_the_late_subset_by_passes_and_joined():
    model, data = eval_models.build("convchain"), eval_models.batches("convchain", 64, 16)
    join_after = _subset_iteration.Subset.join_after
    _, by_passes = eval_late_subset_ranks.timed_eval(model, data, 2**20, "by passes")
    assert _subset_iteration.Subset.join_after is join_after
    _, joined = eval_late_subset_ranks.timed_eval(model, data, 2**20, "joined")

    passes, subset_passes = _counts(joined, "joined")
    assert passes > 4 and subset_passes == 2 * (passes - 4)  # one forward a round's solve
    passes, subset_passes = _counts(by_passes, "by passes")
    assert passes > 4 and subset_passes > 2 * (passes - 4)
    assert "over 4 batches" in joined and "over 4 batches" in by_passes


def _counts(line: str, way: str) -> tuple[int, int]:
    """Whole passes and subset passes of a ``way: P + S over B batches, T s`` line."""
    assert line.startswith(f"{way}: ")
    passes, rest = line.removeprefix(f"{way}: ").split(" + ")
    return int(passes), int(rest.split()[0])
