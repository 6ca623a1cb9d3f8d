"""The audit page's figure: per BN layer, mean shift and variance ratio as bars."""

from __future__ import annotations

from typing import Any

import numpy as np
from matplotlib.figure import Figure

from bnstats.report.figures import DPI, WIDTH, png_data_uri

__all__ = ["audit_figure", "png_data_uri", "DPI"]


def audit_figure(layers: list[dict[str, Any]]) -> Figure:
    """Two panels sharing the layer axis (first layer on top): the standardized mean shift
    and the variance ratio (log scale), bars for the mean over channels, dots for the worst
    channel. Flagged layers are drawn in red."""
    names = [layer["name"] or "(model)" for layer in layers]
    y = np.arange(len(layers))[::-1]
    height = 1.2 + 0.32 * len(layers)
    fig = Figure(figsize=(WIDTH, height), layout="constrained")
    shift_ax, ratio_ax = fig.subplots(1, 2, sharey=True)
    colors = ["C3" if layer["flags"] else "C0" for layer in layers]
    _panel(shift_ax, y, layers, "mean_shift", colors)
    shift_ax.set_xlabel("|running_mean - mu| / std")
    shift_ax.set_yticks(y, names)
    _panel(ratio_ax, y, layers, "var_ratio", colors)
    ratio_ax.set_xscale("log")
    ratio_ax.axvline(1.0, color="black", lw=0.8)
    ratio_ax.set_xlabel("running_var / var")
    return fig


def _panel(ax: Any, y: np.ndarray, layers: list[dict[str, Any]], key: str, colors: list) -> None:
    means = np.array([_finite(layer[key]["mean"]) for layer in layers])
    worst = np.array([_finite(layer[key]["worst"]) for layer in layers])
    if key == "var_ratio":
        ax.barh(y, means - 1.0, left=1.0, color=colors, alpha=0.7, label="mean over channels")
    else:
        ax.barh(y, means, color=colors, alpha=0.7, label="mean over channels")
    ax.plot(worst, y, "o", color="black", ms=4, label="worst channel")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(loc="lower right", fontsize="small")


def _finite(value: float | None) -> float:
    return np.nan if value is None else float(value)
