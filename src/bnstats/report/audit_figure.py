"""The audit page's figure: per BN layer, mean shift and variance ratio as bars.

The variance ratio is drawn on a log scale (a ratio of 2 is as far from 1 as 0.5), with
ticks chosen for the data's own range: decades and 2 and 5 over a wide range, round values
such as 0.9, 1.0, 1.1, ... over a narrow one, so that the worst channel can always be read off
the axis. Tick labels share one number format.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import FixedFormatter, FixedLocator, MaxNLocator, NullLocator

from bnstats.report.figures import DPI, WIDTH, png_data_uri

__all__ = ["audit_figure", "ratio_ticks", "png_data_uri", "DPI"]

FONT_SIZE = 13
"""Points for tick labels, axis labels and legend: at :data:`DPI`, scaled into the page's
figure column, about as large as the page's own text."""
FLAGGED_COLOR = "C3"
PLAIN_COLOR = "C0"
LINEAR_SPAN = 3.0
"""Below this ratio of largest to smallest value, the log axis gets round linear steps."""
MIN_HALF_SPAN = math.log10(1.05)
"""The ratio axis reaches at least from 1 / 1.05 to 1.05, however close to 1 the data are."""


def audit_figure(layers: list[dict[str, Any]]) -> Figure:
    """Two panels sharing the layer axis (first layer on top): the standardized mean shift
    and the variance ratio (log scale), bars for the mean over channels, dots for the worst
    channel. Flagged layers are drawn in red. The figure is returned unsaved, so its
    ``axes`` (mean shift, then variance ratio) can be read."""
    names = [layer["name"] or "(model)" for layer in layers]
    y = np.arange(len(layers))[::-1]
    height = 1.6 + 0.36 * len(layers)
    fig = Figure(figsize=(WIDTH, height), layout="constrained")
    shift_ax, ratio_ax = fig.subplots(1, 2, sharey=True)
    colors = [FLAGGED_COLOR if layer["flags"] else PLAIN_COLOR for layer in layers]
    _panel(shift_ax, y, layers, "mean_shift", colors)
    shift_ax.set_xlabel("|running_mean - mu| / std", fontsize=FONT_SIZE)
    shift_ax.set_yticks(y, names)
    _panel(ratio_ax, y, layers, "var_ratio", colors)
    ratio_ax.axvline(1.0, color="black", lw=0.8)
    ratio_ax.set_xlabel("running_var / var (log scale)", fontsize=FONT_SIZE)
    _ratio_axis(ratio_ax, _ratio_values(layers))
    for ax in (shift_ax, ratio_ax):
        ax.tick_params(labelsize=FONT_SIZE)
    handles = _legend_handles({bool(layer["flags"]) for layer in layers})
    fig.legend(
        handles=handles,
        loc="outside upper center",
        ncols=len(handles),
        frameon=False,
        fontsize=FONT_SIZE,
    )
    return fig


def _panel(ax: Axes, y: np.ndarray, layers: list[dict[str, Any]], key: str, colors: list) -> None:
    means = np.array([_finite(layer[key]["mean"]) for layer in layers])
    worst = np.array([_finite(layer[key]["worst"]) for layer in layers])
    if key == "var_ratio":
        ax.set_xscale("log")
        ax.barh(y, means - 1.0, left=1.0, color=colors, alpha=0.7)
    else:
        ax.barh(y, means, color=colors, alpha=0.7)
    ax.plot(worst, y, "o", color="black", ms=5)
    ax.grid(axis="x", alpha=0.3)


def _legend_handles(flagged: set[bool]) -> list:
    """A bar of each color drawn (unflagged, flagged), then the worst-channel dot."""
    handles = []
    if False in flagged:
        handles.append(Patch(color=PLAIN_COLOR, alpha=0.7, label="mean over channels"))
    if True in flagged:
        label = "flagged layer" if False in flagged else "mean over channels (flagged layers)"
        handles.append(Patch(color=FLAGGED_COLOR, alpha=0.7, label=label))
    handles.append(
        Line2D([], [], marker="o", ls="none", color="black", ms=5, label="worst channel")
    )
    return handles


def _ratio_values(layers: list[dict[str, Any]]) -> np.ndarray:
    """Every finite, positive variance ratio drawn (means and worst channels)."""
    values = np.array(
        [_finite(layer["var_ratio"][part]) for layer in layers for part in ("mean", "worst")]
    )
    return values[np.isfinite(values) & (values > 0)]


def _ratio_axis(ax: Axes, values: np.ndarray) -> None:
    """Limits that hold 1 and every value, with :func:`ratio_ticks` labelled."""
    low, high = _ratio_limits(values)
    ax.set_xlim(low, high)
    ticks, labels = ratio_ticks(low, high)
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_major_formatter(FixedFormatter(labels))
    ax.xaxis.set_minor_locator(NullLocator())


def _ratio_limits(values: np.ndarray) -> tuple[float, float]:
    """1 and ``values``, widened by 6 % of their span on each side in log space."""
    logs = np.log10(np.append(values, 1.0))
    low, high = float(logs.min()), float(logs.max())
    pad = 0.06 * (high - low)
    low, high = min(low - pad, -MIN_HALF_SPAN), max(high + pad, MIN_HALF_SPAN)
    return 10.0**low, 10.0**high


def ratio_ticks(low: float, high: float) -> tuple[list[float], list[str]]:
    """Ticks inside ``[low, high]`` (``0 < low < 1 < high``) and their labels.

    Over a narrow range (``high / low < 3``) round linear steps (0.9, 1.0, 1.1, ...); up to
    a factor 10, the values 1, 1.5, 2, 3, 5, 7 of each decade; up to three decades 1, 2, 5;
    beyond, the decades. 1 is always a tick. Labels share one format: the same number of
    decimals for all (``:g`` when the ticks span more than a decade)."""
    if high / low < LINEAR_SPAN:
        candidates = MaxNLocator(nbins=6, steps=[1, 2, 2.5, 5, 10]).tick_values(low, high)
        rounded = (float(f"{t:.12g}") for t in candidates)
        ticks = [t for t in rounded if low <= t <= high]
        return ticks, _same_decimals(ticks)
    decades = math.log10(high / low)
    if decades < 1:
        mantissas: tuple[float, ...] = (1, 1.5, 2, 3, 5, 7)
    elif decades <= 3:
        mantissas = (1, 2, 5)
    else:
        mantissas = (1,)
    step = max(1, math.ceil(decades / 8)) if mantissas == (1,) else 1
    exponents = range(math.floor(math.log10(low)), math.ceil(math.log10(high)) + 1)
    ticks = [
        m * 10.0**e
        for e in exponents
        if e % step == 0
        for m in mantissas
        if low <= m * 10.0**e <= high
    ]
    labels = _same_decimals(ticks) if decades < 1 else [f"{t:g}" for t in ticks]
    return ticks, labels


def _same_decimals(ticks: list[float]) -> list[str]:
    """All ``ticks`` with as many decimals as the finest of them needs (at most 6)."""
    decimals = max((_decimals(t) for t in ticks), default=0)
    return [f"{t:.{decimals}f}" for t in ticks]


def _decimals(value: float) -> int:
    return next(d for d in range(7) if d == 6 or abs(round(value, d) - value) < 1e-9)


def _finite(value: float | None) -> float:
    return np.nan if value is None else float(value)
