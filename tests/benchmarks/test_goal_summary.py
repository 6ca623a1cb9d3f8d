"""The closing lines of benchmarks/run.py: which missed goals a quick run's sizes explain."""

from __future__ import annotations

import benchmarks.run as runner
from benchmarks.config import full_config, on_device, quick_config, tiny_config
from benchmarks.report import Goal, Result

WHY = "a narrower model than the full run's"


def _results(*goals: Goal) -> list[Result]:
    return [
        Result("a", "first", goals=list(goals[:2])),
        Result("f", "second", goals=list(goals[2:])),
    ]


def test_quick_misses_are_told_apart_from_the_others():
    results = _results(
        Goal("time ratio", 1.14, 1.0, full_size_only=WHY),
        Goal("error", 1e-7, 1e-6, full_size_only=WHY),  # met: not listed
        Goal("recovery", 0.42, 0.5, at_most=False),
    )
    assert runner.missed_summary(results).splitlines() == [
        "2 goal(s) missed; 1 of them are expected at quick sizes (their goals are set for the "
        "full run's sizes):",
        f"  a: time ratio: 1.14 ({WHY})",
        "1 not explained by the quick sizes:",
        "  f: recovery: 0.42",
    ]
    report = runner.report_object("cmd", "now", 1.0, tiny_config(), {}, results)
    assert report["goals_missed"] == ["a: time ratio", "f: recovery"]
    assert report["goals_missed_expected_at_quick_sizes"] == ["a: time ratio"]


def test_without_size_notes_the_count_alone():
    assert runner.missed_summary(_results(Goal("t", 0.5, 1.0))) == "all goals met"
    assert runner.missed_summary(_results(Goal("t", 2.0, 1.0))) == "1 goal(s) missed"
    every_miss_expected = _results(Goal("t", 2.0, 1.0, full_size_only=WHY))
    assert (
        runner.missed_summary(every_miss_expected)
        .splitlines()[0]
        .startswith("1 goal(s) missed; 1 of them are expected at quick sizes")
    )


def test_which_runs_have_smaller_sizes_than_the_full_run():
    full, quick = full_config(), quick_config()
    assert not full.narrower_models and not full.shorter_training
    assert quick.narrower_models and quick.shorter_training and tiny_config().narrower_models
    gpu_quick = on_device(quick, "cuda")  # on a GPU the quick run takes ResNet-18 itself
    assert not gpu_quick.narrower_models and gpu_quick.shorter_training
