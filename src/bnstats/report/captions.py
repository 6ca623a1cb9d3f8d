"""The sentences beside each figure, computed from the run they describe.

Every number a sentence states is taken from its arguments, and every comparison it makes
("at chance level", "closer than a single batch") is decided from them, so the words stay
true whatever the run. Statistics use the lecture's notation: ``mu``, ``var`` (σ²), and the
EMA's ``momentum`` is PyTorch's, the weight of the newest batch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from bnstats.methods import ESTIMATE_METHODS, METHODS, RUNNING_EMA
from bnstats.report.lecture import LectureTrace

SYMBOL = {"mean": "μ", "var": "σ²"}
"""The lecture's symbol of each statistic."""

NEAR = 0.01
"""Accuracy within this of the EMA's counts as having caught up with it."""


def lecture_sentences(trace: LectureTrace, epochs: int, train_rows: int) -> list[str]:
    """What the lecture's picture of ``trace`` shows: the dots, the start of both EMAs, and
    how close the EMAs end to the population value compared with one batch's scatter."""
    sentences = [_dots_sentence(trace, epochs)]
    if trace.stat == "var":
        sentences.append(bessel_sentence())
    sentences.append(_start_sentence(trace))
    sentences.append(_end_sentence(trace, epochs, train_rows))
    return sentences


def _dots_sentence(trace: LectureTrace, epochs: int) -> str:
    units = ", ".join(str(u) for u in trace.units)
    plural = "s" if len(trace.units) > 1 else ""
    run = f"{epochs} epoch{'s' if epochs != 1 else ''}"
    if trace.virtual:
        what = (
            f"one virtual batch: Ghost Batch Norm cut each of the {trace.training_steps} "
            f"training batches of {run} into virtual batches, normalized each with its own "
            f"{SYMBOL[trace.stat]}, and the estimators took one update per virtual batch, "
            f"{trace.steps} in all"
        )
    else:
        what = f"one mini-batch at one of the {trace.steps} training steps of {run}"
    return (
        f"Layer {trace.layer}, unit{plural} {units} of its {trace.features}, one panel each. "
        f"Each dot is the {SYMBOL[trace.stat]} of {what}: {batch_sizes_text(trace.batch_size)}."
    )


def batch_sizes_text(batch_size: np.ndarray) -> str:
    """``"420 batches of 64 rows and 20 of 3 (open circles)"``, the full size first."""
    sizes, counts = np.unique(np.asarray(batch_size), return_counts=True)
    order = np.argsort(-sizes, kind="stable")
    parts = [
        f"{int(counts[i])} batch{'es' if counts[i] != 1 else ''} of {int(sizes[i])} rows"
        for i in order
    ]
    if len(parts) == 1:
        return parts[0]
    return f"{', '.join(parts[:-1])} and {parts[-1]} (the short ones drawn as open circles)"


def bessel_sentence() -> str:
    """Why and how the batch variances were made unbiased."""
    return (
        "Training normalizes each batch with its biased variance (divided by n) and that is "
        "what the history records, but the estimators hold the unbiased variance, as PyTorch "
        "does. To compare like with like each dot is multiplied by n/(n − 1), n being the "
        "rows of that dot's batch."
    )


def _start_sentence(trace: LectureTrace) -> str:
    m, unit, sym = trace.momentum, trace.units[0], SYMBOL[trace.stat]
    start = "0" if trace.stat == "mean" else "1"
    step = "update" if trace.virtual else "step"
    settled = steps_until_debiased(m)
    if settled <= trace.steps:
        below = f"below 1.01 from {step} {settled} on"
    else:
        below = (
            f"still {debias_factor(m, trace.steps):.3g} at this run's last {step}, "
            f"{trace.steps} (below 1.01 only from {step} {settled} on)"
        )
    return (
        f"The EMA (momentum {m:g}, the weight of the newest batch) starts at {start}: after "
        f"{step} 1 unit {unit}'s EMA is {trace.ema[0, unit]:.3g} while that batch's {sym} was "
        f"{trace.batch[0, unit]:.3g}. The debiased EMA divides by 1 − (1 − {m:g})^t, a factor "
        f"of {debias_factor(m, 1):.3g} at {step} 1 and {debias_factor(m, 10):.3g} at {step} "
        f"10, {below}; it starts at the first batch's value, "
        f"{trace.ema_debiased[0, unit]:.3g}."
    )


def _end_sentence(trace: LectureTrace, epochs: int, train_rows: int) -> str:
    sym = SYMBOL[trace.stat]
    last = trace.batch[-max(1, trace.steps // max(1, epochs)) :]
    if trace.stat == "mean":
        gap = _mean_abs(trace.ema[-1] - trace.population)
        gap_debiased = _mean_abs(trace.ema_debiased[-1] - trace.population)
        spread = float(np.mean(last.std(axis=0)))
        unit_text = ""
        numbers = (f"{gap:.3g}", f"{gap_debiased:.3g}", f"{spread:.3g}")
    else:
        scale = np.maximum(trace.population, np.finfo(float).tiny)
        gap = _mean_abs((trace.ema[-1] - trace.population) / scale)
        gap_debiased = _mean_abs((trace.ema_debiased[-1] - trace.population) / scale)
        spread = float(np.mean(last.std(axis=0) / scale))
        unit_text = " of the population value"
        numbers = (f"{100 * gap:.3g} %", f"{100 * gap_debiased:.3g} %", f"{100 * spread:.3g} %")
    verdict = (
        "averaging over batches removes most of that scatter"
        if gap < spread
        else "the EMA ends no closer to it than a typical single batch"
    )
    return (
        f"The dashed line is the population {sym}: the exact value over all {train_rows} "
        f"training rows, recomputed after training with the final weights. Over all "
        f"{trace.features} units the final EMA differs from it by {numbers[0]}{unit_text} on "
        f"average (the debiased EMA by {numbers[1]}), while the batches of the last epoch "
        f"scatter by {numbers[2]} around their own average (standard deviation): {verdict}."
    )


def accuracy_sentences(
    accuracy: Mapping[str, float], chance: float, test_rows: int, classes_at_one: int
) -> list[str]:
    """What the accuracy bars show; ``classes_at_one`` is how many distinct classes the
    network answered when each test row was normalized by itself."""
    one = accuracy["batch@1"]
    estimates = {k: v for k, v in accuracy.items() if k in ESTIMATE_METHODS}
    best = max(estimates.values())
    winners = " and ".join(METHODS[k].label for k, v in estimates.items() if v == best)
    listed = ", ".join(f"{METHODS[k].label} {v:.3f}" for k, v in estimates.items())
    return [
        f"Test accuracy on the {test_rows} test rows for each way of getting μ and σ² at test "
        f"time. The dotted line is chance level, {chance:.3f}: always answering the most "
        "common class.",
        f"Normalizing each test row by itself (batch@1) gives {one:.3f}, "
        f"{chance_relation(one, chance)}. With one row μ = z and σ² = 0, so z_norm = 0 and "
        f"every row leaves the layer as β whatever its input: the network answered "
        f"{classes_at_one} distinct class{'es' if classes_at_one != 1 else ''} for the "
        f"{test_rows} rows.",
        f"Test batches of 8 normalized by their own statistics give {accuracy['batch@8']:.3f}, "
        f"the whole test set as one batch {accuracy['batch@all']:.3f}.",
        f"The running estimates, fixed after training, give {listed}; the best here is "
        f"{winners} ({best:.3f}).",
    ]


def chance_relation(value: float, chance: float) -> str:
    """``"at chance level"``, or above/below it, judged at the three decimals shown."""
    if round(value, 3) == round(chance, 3):
        return "chance level"
    side = "above" if value > chance else "below"
    return f"{side} chance level"


def batch_size_sentences(by_size: Mapping[int, float], fixed: Mapping[str, float]) -> list[str]:
    """What test accuracy against test batch size shows, batch statistics vs ``fixed``
    running estimates (names of :data:`~bnstats.methods.ESTIMATE_METHODS`, the EMA's among
    them)."""
    sizes = sorted(by_size)
    first, last = by_size[sizes[0]], by_size[sizes[-1]]
    verb = "rises" if last > first else "falls" if last < first else "stays"
    ema = fixed[RUNNING_EMA.name]
    caught = [s for s in sizes if by_size[s] >= ema - NEAR]
    if caught:
        reach = (
            f"It first comes within {NEAR} of the EMA's {ema:.3f} with batches of {caught[0]}; "
            "even then a row's prediction depends on which other rows share its batch."
        )
    else:
        reach = f"At no size tried does it come within {NEAR} of the EMA's {ema:.3f}."
    listed = ", ".join(f"{METHODS[k].label} {v:.3f}" for k, v in fixed.items())
    return [
        f"With the test batch's own statistics, accuracy {verb} from {first:.3f} with batches "
        f"of {sizes[0]} to {last:.3f} with batches of {sizes[-1]}.",
        reach,
        "The running estimates normalize every row with the same fixed μ and σ², so their "
        f"accuracy does not depend on the test batch size: the flat lines ({listed}).",
    ]


def debias_factor(momentum: float, t: int) -> float:
    """The bias correction ``1 / (1 - (1 - momentum)**t)`` at step ``t``."""
    return 1.0 / (1.0 - (1.0 - momentum) ** t)


def steps_until_debiased(momentum: float, within: float = 0.01) -> int:
    """The first step from which the correction factor is at most ``1 + within``."""
    if momentum >= 1.0:
        return 1
    # 1 / (1 - d**t) <= 1 + w  <=>  d**t <= w / (1 + w)
    t = math.ceil(math.log(within / (1 + within)) / math.log(1.0 - momentum))
    while t > 1 and debias_factor(momentum, t - 1) <= 1 + within:
        t -= 1
    while debias_factor(momentum, t) > 1 + within:
        t += 1
    return max(t, 1)


def _mean_abs(values: np.ndarray) -> float:
    return float(np.mean(np.abs(values)))
