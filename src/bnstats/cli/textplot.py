"""A small character plot for the terminal: the lecture's picture without matplotlib."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

TERMINAL_WIDTH = 80


def line_plot(
    series: Sequence[tuple[str, str, np.ndarray]],
    width: int = 72,
    height: int = 12,
    x_label: str = "step",
) -> str:
    """Plot ``(label, mark, values)`` series sharing one x axis (their index, 1-based, named
    ``x_label``) in at most ``width`` columns; the later series is drawn over the earlier.
    Long series are sampled to the columns, and the y range is that of the values drawn.
    Every line fits :data:`TERMINAL_WIDTH` columns."""
    values = [np.asarray(v, dtype=float) for _, _, v in series]
    length = max(len(v) for v in values)
    columns = min(width, length)
    while True:
        picks = np.linspace(0, length - 1, columns).round().astype(int)
        drawn = [v[np.minimum(picks, len(v) - 1)] for v in values]
        low, high = float(np.nanmin(drawn)), float(np.nanmax(drawn))
        label_width = max(len(f"{high:.3g}"), len(f"{low:.3g}"))
        if label_width + 2 + columns <= TERMINAL_WIDTH or columns == 1:
            break
        columns = TERMINAL_WIDTH - label_width - 2
    span = high - low or 1.0
    grid = [[" "] * columns for _ in range(height)]
    for (_, mark, _), points in zip(series, drawn, strict=True):
        for col, value in enumerate(points):
            grid[height - 1 - int(round((value - low) / span * (height - 1)))][col] = mark
    lines = []
    for i, row in enumerate(grid):
        tick = f"{high:.3g}" if i == 0 else f"{low:.3g}" if i == height - 1 else ""
        lines.append(f"{tick:>{label_width}} |{''.join(row)}")
    lines.append(" " * label_width + " +" + "-" * columns)
    lines.append(" " * label_width + f"  {x_label} 1 .. {length}")
    legend = "   ".join(f"{mark} {label}" for label, mark, _ in series)
    lines.append(" " * label_width + "  " + legend)
    return "\n".join(lines)
