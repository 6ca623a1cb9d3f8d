"""A small character plot for the terminal: the lecture's picture without matplotlib."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def line_plot(
    series: Sequence[tuple[str, str, np.ndarray]],
    width: int = 72,
    height: int = 12,
) -> str:
    """Plot ``(label, mark, values)`` series sharing one x axis (their index); the later
    series is drawn over the earlier. Returns the lines, with the y range and a legend."""
    length = max(len(values) for _, _, values in series)
    columns = min(width, length)
    picks = np.linspace(0, length - 1, columns).round().astype(int)
    stacked = np.concatenate([np.asarray(values, dtype=float) for _, _, values in series])
    low, high = float(np.nanmin(stacked)), float(np.nanmax(stacked))
    span = high - low or 1.0
    grid = [[" "] * columns for _ in range(height)]
    for _, mark, values in series:
        values = np.asarray(values, dtype=float)
        for col, step in enumerate(picks):
            value = values[min(step, len(values) - 1)]
            row = height - 1 - int(round((value - low) / span * (height - 1)))
            grid[row][col] = mark
    label_width = max(len(f"{high:.3g}"), len(f"{low:.3g}"))
    lines = []
    for i, row in enumerate(grid):
        tick = f"{high:.3g}" if i == 0 else f"{low:.3g}" if i == height - 1 else ""
        lines.append(f"{tick:>{label_width}} |{''.join(row)}")
    lines.append(" " * label_width + " +" + "-" * columns)
    lines.append(" " * label_width + f"  step 1 .. {length}")
    legend = "   ".join(f"{mark} {label}" for label, mark, _ in series)
    lines.append(" " * label_width + "  " + legend)
    return "\n".join(lines)
