"""The report's momentum slider: the EMA and the debiased EMA redrawn in the browser, for any
momentum, through the batches the estimators took; and test accuracy against momentum.

The page carries, as JSON, every update's biased ``mu``, ``var`` and count of the shown units
and the population value; :data:`SCRIPT` applies the estimators' own recurrence
(:class:`bnstats.stats.EMA`) to them::

    w_t = momentum                  debiased: momentum / (1 - (1 - momentum)**t)
    running = (1 - w_t) * running + w_t * x_t       x_t = mu, or var * count / (count - 1)

starting from 0 (``mu``) and 1 (``var``), or, debiased, from the first batch. The numbers
beside the panels are the final estimates, their distance from the population value, the
effective window ``1 / momentum`` and the weight ``(1 - momentum)**t`` still on the start.
Accuracy against momentum is measured in Python for :data:`GRID` and drawn by the script.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

import numpy as np

from bnstats.engine import History
from bnstats.methods import DEBIASED_EMA, RUNNING_EMA, Method
from bnstats.report.captions import SYMBOL
from bnstats.report.html import Section, Table
from bnstats.report.lecture import LectureTrace

GRID = tuple(float(m) for m in np.geomspace(1e-3, 1.0, 12))
"""The momenta whose test accuracy the page shows: 12, log-spaced from 0.001 to 1."""
COLOR_NAMES = {RUNNING_EMA.color: "blue", DEBIASED_EMA.color: "orange"}
SLIDER_STEPS = 600
"""Positions of the slider between momentum 0.001 and 1 (log scale)."""


def momentum_data(
    history: History, traces: Mapping[str, LectureTrace], accuracy: Mapping[str, Sequence[float]]
) -> dict:
    """What the script needs: the run's momentum, per update the counts and, per statistic
    and shown unit, the biased batch values, the population values, and accuracy on
    :data:`GRID` by method name."""
    mean = traces["mean"]
    seen = history.moments_seen(mean.layer)
    return {
        "layer": mean.layer,
        "momentum": mean.momentum,
        "units": list(mean.units),
        "count": [int(count) for _, _, count in seen],
        "batch": {
            "mean": [[float(mu[u]) for mu, _, _ in seen] for u in mean.units],
            "var": [[float(var[u]) for _, var, _ in seen] for u in mean.units],
        },
        "population": {
            stat: [float(trace.population[u]) for u in trace.units]
            for stat, trace in traces.items()
        },
        "grid": list(GRID),
        "accuracy": {name: list(values) for name, values in accuracy.items()},
        "labels": {m.name: m.label for m in (RUNNING_EMA, DEBIASED_EMA)},
        "colors": {m.name: m.color for m in (RUNNING_EMA, DEBIASED_EMA)},
        "symbols": SYMBOL,
        "virtual": mean.virtual,
    }


def data_block(data: dict) -> str:
    """``data`` as a JSON block the script reads (``</`` escaped so it cannot end the tag)."""
    text = json.dumps(data, separators=(",", ":")).replace("</", "<\\/")
    return f'<script type="application/json" id="momentum-data">{text}</script>'


def slider_position(momentum: float) -> int:
    """The slider position nearest ``momentum`` on its log scale from 0.001 to 1."""
    return round(SLIDER_STEPS * (np.log10(momentum) + 3) / 3)


def momentum_section(
    history: History, traces: Mapping[str, LectureTrace], accuracy: Mapping[str, Sequence[float]]
) -> Section:
    """The slider, its panels and numbers, and accuracy against momentum with its table."""
    data = momentum_data(history, traces, accuracy)
    m, ema, debiased = data["momentum"], RUNNING_EMA, DEBIASED_EMA
    step = "update" if data["virtual"] else "step"
    widget = (
        '<div class="momentum">'
        f'<label for="momentum-slider">momentum <output id="momentum-value" '
        f'data-momentum="{m!r}">{m:g}</output></label>'
        f'<input type="range" id="momentum-slider" min="0" max="{SLIDER_STEPS}" step="1" '
        f'value="{slider_position(m)}" list="momentum-marks" aria-label="momentum, log scale">'
        f'<datalist id="momentum-marks"><option value="{slider_position(m)}" '
        f'label="this run, {m:g}"></option></datalist>'
        f'<p class="scale">0.001 · 0.01 · 0.1 · 1 (log scale); the run used {m:g}, marked '
        f"on the slider. The numbers count {step}s.</p>"
        '<div id="momentum-numbers"></div>'
        f'<p class="scale">Grey dots: each batch the estimators took ({SYMBOL["var"]} made '
        f"unbiased); {ema.label} ({color_name(ema)}) and {debiased.label} "
        f"({color_name(debiased)}) at the slider's momentum; dashed: the population "
        "value.</p>"
        '<div id="momentum-panels"></div>'
        '<div id="momentum-accuracy"></div>'
        f'<p class="scale">Test accuracy against momentum (log scale), {ema.label} '
        f"({color_name(ema)}) and {debiased.label} ({color_name(debiased)}); grey dashed: "
        "this run's momentum; black: the slider's.</p>"
        "<noscript><p>The slider needs JavaScript; the table below holds the measured "
        "accuracies.</p></noscript>"
        f"{data_block(data)}</div>"
    )
    rows = [
        (f"{g:.4g}", *(f"{accuracy[name][i]:.4f}" for name in accuracy)) for i, g in enumerate(GRID)
    ]
    table = Table(
        ("momentum", *(data["labels"][name] for name in accuracy)),
        rows,
        caption="Test accuracy against the EMA's momentum, every other setting as in this run",
        numeric=tuple(range(len(accuracy) + 1)),
    )
    return Section(
        "momentum",
        "Move the momentum",
        sentences=momentum_sentences(m, len(data["count"]), step),
        tables=(table,),
        widget=widget,
    )


def color_name(method: Method) -> str:
    """The word for a method's colour on the page."""
    return COLOR_NAMES.get(method.color, method.color)


def momentum_sentences(momentum: float, updates: int, step: str) -> list[str]:
    """What the slider shows."""
    return [
        "The lecture's β trades lag against noise; here it is 1 − momentum. Move the slider "
        f"and the EMA and the debiased EMA are recomputed in this page from the same {updates} "
        f"batches the estimators took, exactly as the estimators compute them; the dashed "
        "line is the population value they aim at.",
        f"A large momentum follows each batch closely and ends as noisy as one batch; a small "
        f"one averages about 1/momentum {step}s (the effective window) but starts far from the "
        f"data: after t {step}s the start still weighs (1 − momentum)^t, which the debiased "
        f"EMA divides away. This run used momentum {momentum:g}.",
        "Below, test accuracy with an EMA of each momentum in every layer, fed the batches "
        "the layers' estimators took in this run: where the window is too short the estimate "
        "is noisy, where it is too long the start and the early weights still weigh.",
    ]
