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
