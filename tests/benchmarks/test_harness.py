"""Smoke tests of the benchmark harness: timing helpers, the printer, tiny comparisons.

No timing is asserted: only that contenders alternate, that medians and ratios are the
numbers they claim to be, and that a comparison runs end to end and serializes.
"""

from __future__ import annotations

import json

import benchmarks.run as runner
import pytest
from benchmarks.config import tiny_config
from benchmarks.report import Goal, Result, Table, fmt, render
from benchmarks.timing import Contender, Timings, alternate, calls_for, rotated


def test_alternate_rotates_the_order_and_prepares_every_block():
    calls: list[str] = []
    prepared: list[str] = []

    def contender(name: str) -> Contender:
        return Contender(
            name, lambda state: calls.append(state), lambda: prepared.append(name) or name
        )

    timings = alternate([contender("a"), contender("b"), contender("c")], repeats=3, warmup=1)
    assert calls[:3] == ["a", "b", "c"]  # warm-up
    assert calls[3:] == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]
    assert prepared == calls
    assert all(len(v) == 3 for v in timings.seconds.values())
    assert set(timings.cpu_seconds) == {"a", "b", "c"}


def test_medians_and_paired_ratios():
    timings = Timings({"x": [1.0, 4.0, 2.0], "ref": [2.0, 2.0, 1.0]})
    assert timings.median("x") == 2.0
    assert timings.paired_ratios("x", "ref") == [0.5, 2.0, 2.0]
    assert timings.ratio("x", "ref") == 2.0
    assert timings.ratio_range("x", "ref") == (0.5, 2.0)
    summary = timings.summary("ref")
    assert summary["ref"]["ratio"] == 1.0 and summary["x"]["median_s"] == 2.0


def test_the_basis_chooses_wall_clock_or_cpu_time():
    timings = Timings(
        {"x": [2.0, 2.0, 2.0], "ref": [1.0, 1.0, 1.0]},
        cpu_seconds={"x": [1.0, 1.5, 1.0], "ref": [1.0, 1.0, 1.0]},
        basis="cpu",
    )
    assert timings.ratio("x", "ref") == 1.0 and timings.ratio("x", "ref", "wall") == 2.0
    summary = timings.summary("ref")["x"]
    assert summary["basis"] == "cpu" and summary["wall_ratio"] == 2.0
    assert summary["ratio_max"] == 1.5
    with pytest.raises(ValueError, match="basis"):
        timings.median("x", "gpu")


def test_helpers_and_argument_checks():
    assert rotated([1, 2, 3], 4) == [2, 3, 1]
    assert calls_for(0.1, 1.0) == 10 and calls_for(10.0, 1.0, at_least=2) == 2
    with pytest.raises(ValueError, match="unique"):
        alternate([Contender("a", print), Contender("a", print)], repeats=1)
    with pytest.raises(SystemExit):
        runner.parse_args(["--only", "z"])
    assert runner.parse_args(["--only", "a, c"]).keys == ["a", "c"]


def test_goal_verdicts_and_printer():
    assert Goal("t", 0.9, 1.0).verdict == "PASS"
    assert Goal("t", 1.1, 1.0).verdict == "MISS"
    assert Goal("t", 2.0, 1.0, at_most=False).passed
    assert not Goal("t", float("nan"), 1.0).passed
    table = Table("T", ["name", "value"])
    table.add("x", 1.23456e-7)
    with pytest.raises(ValueError):
        table.add("too", "many", "cells")
    text = render(Result("z", "title", tables=[table], goals=[Goal("g", 0.5, 1.0)]))
    assert "1.23e-07" in text and "[PASS] g" in text
    assert fmt(12345.6) == "12346" and fmt(0.5) == "0.5"


@pytest.fixture
def one_thread():
    """Run with torch and BLAS on one thread, as run.py does; put the counts back after."""
    import torch
    from threadpoolctl import threadpool_limits

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(1):
        yield
    torch.set_num_threads(before)


def smaller_sizes_miss(key: str, goal: str) -> bool:
    """Whether a run at smaller sizes than the full run's is expected to miss this goal:
    a) and c) time narrower models than ResNet-18, e) trains for fewer steps."""
    return (
        (key == "a" and goal == "bt.recalibrate time / update_bn time")
        or key == "c"
        or (key == "e" and "EMA(0.01)" in goal)
    )


@pytest.mark.parametrize("key", ["a", "b", "c", "d", "e", "f"])
def test_tiny_comparison_runs_and_serializes(key, one_thread):
    config = tiny_config()
    (result,) = runner.run_all([key], config, log=None)
    assert result.key == key and result.goals and result.tables
    marked = {g.text: bool(g.full_size_only) for g in result.goals}
    assert marked == {text: smaller_sizes_miss(key, text) for text in marked}
    assert all(len(row) == len(t.columns) for t in result.tables for row in t.rows)
    assert f"== {key})" in render(result)
    report = runner.report_object("cmd", "now", 1.0, config, {"cores": 2}, [result])
    assert json.loads(json.dumps(report, default=float))["results"][key]["goals"]
