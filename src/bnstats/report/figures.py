"""The report's figures, drawn with matplotlib and returned as PNG data URIs.

Figures are built with matplotlib's object interface (:class:`matplotlib.figure.Figure` on
the Agg renderer), never pyplot: nothing opens a window, needs a display, or changes the
backend of a program that imports bnstats. Needs the ``report`` extra.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Mapping

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from bnstats.methods import BATCH_COLOR, DEBIASED_EMA, METHODS, RUNNING_EMA
from bnstats.report.captions import SYMBOL
from bnstats.report.lecture import LectureTrace, typical_batch_size

DPI = 144
WIDTH = 7.5
"""Figure width in inches; at :data:`DPI` the PNG is 1080 pixels wide."""

TARGET_COLOR = "black"
"""The population value in the lecture's picture: the line the estimates aim at."""
LABEL_GAP = 0.06
"""Least distance, in accuracy, between the value labels of the flat lines."""
FLAT_STYLES = ({"lw": 2.4}, {"lw": 1.2, "ls": "--"}, {"lw": 1.2, "ls": "-."}, {"lw": 1.0})
"""Line styles of the flat lines, so that equal accuracies stay visible on top of each other."""


def lecture_figure(trace: LectureTrace) -> Figure:
    """The lecture's picture for ``trace``: one panel per chosen unit with every batch's value
    (dots; batches of an unusual size, an epoch's short last batch, as open circles), the EMA
    and the debiased EMA through them, and the population value (dashed)."""
    units = trace.units
    fig = Figure(figsize=(WIDTH, 0.9 + 1.9 * len(units)), layout="constrained")
    axes = fig.subplots(len(units), 1, sharex=True, squeeze=False)[:, 0]
    for ax, unit in zip(axes, units, strict=True):
        _lecture_panel(ax, trace, unit)
    axes[-1].set_xlabel(
        "estimator update (one per virtual batch)" if trace.virtual else "training step"
    )
    kind = "unbiased σ²" if trace.stat == "var" else "μ"
    batch = "virtual batch" if trace.virtual else "mini-batch"
    fig.suptitle(f"Layer {trace.layer}: {kind} of each {batch}, EMA momentum {trace.momentum:g}")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=len(labels), frameon=False)
    return fig


def _lecture_panel(ax: Axes, trace: LectureTrace, unit: int) -> None:
    steps = np.arange(1, trace.steps + 1)
    sym = SYMBOL[trace.stat]
    short = trace.batch_size != typical_batch_size(trace.batch_size)
    batch = trace.batch[:, unit]
    ax.plot(steps[~short], batch[~short], ".", ms=3, color=BATCH_COLOR, label=f"batch {sym}")
    if short.any():
        sizes = ", ".join(str(int(s)) for s in np.unique(trace.batch_size[short]))
        label = f"batch {sym}, {sizes} rows"
        ax.plot(steps[short], batch[short], "o", ms=3.5, mfc="none", color=BATCH_COLOR, label=label)
    ema, debiased = RUNNING_EMA, DEBIASED_EMA
    ax.plot(steps, trace.ema[:, unit], "-", lw=2.4, color=ema.color, label=ema.label)
    ax.plot(
        steps, trace.ema_debiased[:, unit], "-", lw=1.0, color=debiased.color, label=debiased.label
    )
    population = trace.population[unit]
    ax.axhline(population, ls="--", lw=1.2, color=TARGET_COLOR, label="population")
    ax.set_ylabel(f"unit {unit}")
    ax.grid(alpha=0.3)


def accuracy_figure(accuracy: Mapping[str, float], chance: float) -> Figure:
    """Horizontal bars of test accuracy per method, with chance level dotted."""
    names = list(accuracy)
    values = [accuracy[name] for name in names]
    colors = [METHODS[name].color if name in METHODS else BATCH_COLOR for name in names]
    fig = Figure(figsize=(WIDTH, 0.8 + 0.42 * len(names)), layout="constrained")
    ax = fig.subplots()
    rows = np.arange(len(names))
    ax.barh(rows, values, color=colors)
    for row, value in zip(rows, values, strict=True):
        ax.annotate(
            f"{value:.3f}",
            (value, row),
            xytext=(7, 0),
            textcoords="offset points",
            va="center",
            fontsize=9,
            bbox={"boxstyle": "square,pad=0.15", "fc": "white", "ec": "none"},
        )
    ax.axvline(chance, ls=":", color="black", label=f"chance level {chance:.3f}")
    ax.set_yticks(rows, names)
    ax.invert_yaxis()
    ax.set_xlim(0, 1.1)
    ax.set_xlabel("test accuracy")
    fig.legend(loc="outside lower center", frameon=False)
    ax.grid(axis="x", alpha=0.3)
    return fig


def batch_size_figure(
    by_size: Mapping[int, float], fixed: Mapping[str, float], chance: float
) -> Figure:
    """Test accuracy against test batch size with the batch's own statistics, and the
    ``fixed`` running estimates' accuracy as flat lines."""
    sizes = sorted(by_size)
    fig = Figure(figsize=(WIDTH, 3.6), layout="constrained")
    ax = fig.subplots()
    ax.plot(
        sizes,
        [by_size[s] for s in sizes],
        "o-",
        color=BATCH_COLOR,
        label="batch statistics",
    )
    heights = label_heights(list(fixed.values()), gap=LABEL_GAP)
    for i, (name, value) in enumerate(fixed.items()):
        style = FLAT_STYLES[i % len(FLAT_STYLES)]
        method = METHODS.get(name)
        color = method.color if method else "C4"
        label = f"{method.label if method else name} (any batch size)"
        ax.axhline(value, color=color, label=label, zorder=2 + i, **style)
        ax.annotate(
            f"{method.label if method else name} {value:.3f}",
            (1.0, heights[i]),
            xycoords=("axes fraction", "data"),
            xytext=(4, 0),
            textcoords="offset points",
            va="center",
            fontsize=8,
            color=color,
        )
    ax.axhline(chance, ls=":", color="black", label="chance level")
    ax.set_xscale("log", base=2)
    ax.set_xticks(sizes, [str(s) for s in sizes])
    ax.minorticks_off()
    ax.set_ylim(0, 1.15)
    ax.set_yticks(np.linspace(0, 1, 6))
    ax.set_xlabel("test batch size (rows normalized together)")
    ax.set_ylabel("test accuracy")
    fig.legend(loc="outside lower center", ncols=len(fixed) + 2, frameon=False, fontsize=8)
    ax.grid(alpha=0.3)
    return fig


def label_heights(values: list[float], gap: float) -> list[float]:
    """Heights for one text label per value, each as close to its value as it can be while
    no two labels lie closer than ``gap`` (in the values' units); the lowest stays put."""
    order = np.argsort(values, kind="stable")
    heights = [0.0] * len(values)
    floor = -np.inf
    for i in order:
        heights[i] = max(values[i], floor + gap)
        floor = heights[i]
    return heights


def png_data_uri(fig: Figure) -> str:
    """``fig`` as a ``data:image/png;base64,...`` URI (no timestamp, so the same figure
    gives the same bytes)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI, metadata={"Software": None})
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
