"""The terminal plot of the lecture's picture (bnstats.cli.textplot)."""

from __future__ import annotations

import numpy as np

from bnstats.cli.textplot import line_plot


def test_marks_land_on_their_rows():
    rising = np.arange(10, dtype=float)
    flat = np.full(10, 4.5)
    text = line_plot([("flat", "-", flat), ("rising", "*", rising)], width=10, height=10)
    rows = text.splitlines()[:10]
    assert rows[0].endswith("*") and rows[-1].split("|")[1].startswith("*")
    assert rows[0].startswith("9") and rows[-1].lstrip().startswith("0")
    assert "- flat" in text and "* rising" in text and "step 1 .. 10" in text


def test_long_series_are_sampled_to_the_width():
    text = line_plot([("x", ".", np.sin(np.arange(500) / 20))], width=40, height=6)
    assert max(len(line.split("|", 1)[-1]) for line in text.splitlines()[:6]) == 40


def test_constant_series_does_not_divide_by_zero():
    text = line_plot([("c", "o", np.ones(5))], width=5, height=4)
    assert text.count("o") >= 5


def test_fits_80_columns_and_scales_to_what_it_draws():
    """Wide tick labels take columns from the plot; a value between the sampled steps (here
    a spike no column lands on) does not stretch the y range."""
    values = np.linspace(-0.0123456, -0.0012345, 500)
    values[1] = 50.0  # sampled columns skip step 2
    text = line_plot([("x", ".", values)], width=72, height=6, x_label="update")
    assert max(len(line) for line in text.splitlines()) <= 80
    assert text.splitlines()[0].lstrip().startswith("-0.00123")
    assert "update 1 .. 500" in text
