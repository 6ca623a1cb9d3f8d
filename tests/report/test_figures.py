"""The figures draw the run's own numbers, and embed as PNG data URIs."""

from __future__ import annotations

import base64
import struct

import numpy as np
import pytest

pytest.importorskip("matplotlib")

from bnstats.report.figures import (  # noqa: E402
    DPI,
    WIDTH,
    accuracy_figure,
    batch_size_figure,
    lecture_figure,
    png_data_uri,
)
from bnstats.report.lecture import lecture_traces  # noqa: E402


def lines_by_label(ax) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    return {line.get_label(): (line.get_xdata(), line.get_ydata()) for line in ax.get_lines()}


@pytest.mark.parametrize("stat", ["mean", "var"])
def test_lecture_figure_draws_the_trace(quick_run, stat):
    trace = lecture_traces(quick_run.history, quick_run.net, layer="bn2", units=(4, 1))[stat]
    fig = lecture_figure(trace)
    axes = fig.axes
    assert len(axes) == 2
    sym = "μ" if stat == "mean" else "σ²"
    short = trace.batch_size != 64
    assert short.any(), "the digits split leaves a short last batch each epoch"
    for ax, unit in zip(axes, (4, 1), strict=True):
        lines = lines_by_label(ax)
        x, y = lines[f"batch {sym}"]
        np.testing.assert_array_equal(y, trace.batch[~short, unit])
        np.testing.assert_array_equal(x, np.arange(1, trace.steps + 1)[~short])
        np.testing.assert_array_equal(lines[f"batch {sym}, 3 rows"][1], trace.batch[short, unit])
        np.testing.assert_array_equal(lines["EMA"][1], trace.ema[:, unit])
        np.testing.assert_array_equal(lines["debiased EMA"][1], trace.ema_debiased[:, unit])
        assert set(lines["population"][1]) == {trace.population[unit]}
        assert ax.get_ylabel() == f"unit {unit}"
    assert "bn2" in fig.get_suptitle()


def test_accuracy_figure_bars_are_the_accuracies():
    accuracy = {"batch@1": 0.1, "ema": 0.93, "population": 0.95}
    ax = accuracy_figure(accuracy, chance=0.11).axes[0]
    widths = [patch.get_width() for patch in ax.patches]
    assert widths == pytest.approx(list(accuracy.values()))
    assert [t.get_text() for t in ax.get_yticklabels()] == list(accuracy)
    assert {t.get_text() for t in ax.texts} == {"0.100", "0.930", "0.950"}


def test_batch_size_figure_draws_batch_and_flat_lines():
    by_size = {1: 0.1, 8: 0.9, 450: 0.97}
    ax = batch_size_figure(by_size, {"ema": 0.98, "population": 0.975}, chance=0.1).axes[0]
    lines = lines_by_label(ax)
    assert list(lines["batch statistics"][0]) == [1, 8, 450]
    assert list(lines["batch statistics"][1]) == [0.1, 0.9, 0.97]
    assert set(lines["EMA (any batch size)"][1]) == {0.98}
    assert set(lines["population (any batch size)"][1]) == {0.975}


def test_png_data_uri_is_a_png_of_the_promised_width():
    fig = accuracy_figure({"ema": 0.5}, chance=0.1)
    uri = png_data_uri(fig)
    prefix = "data:image/png;base64,"
    assert uri.startswith(prefix)
    data = base64.b64decode(uri[len(prefix) :], validate=True)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width = struct.unpack(">I", data[16:20])[0]
    assert width == round(WIDTH * DPI)
    assert png_data_uri(fig) == uri, "the same figure gives the same bytes"


def test_close_flat_lines_get_labels_that_do_not_overlap():
    from bnstats.report.figures import LABEL_GAP, label_heights

    fig = batch_size_figure({1: 0.1, 450: 0.97}, {"ema": 0.978, "population": 0.976}, 0.1)
    texts = {t.get_text(): t for t in fig.axes[0].texts}
    assert set(texts) == {"EMA 0.978", "population 0.976"}
    low, high = sorted(t.xy[1] for t in texts.values())
    assert high - low >= LABEL_GAP - 1e-12 and low == 0.976
    assert fig.axes[0].get_ylim()[1] > high + 0.02, "the labels stay inside the axes"
    assert label_heights([0.5, 0.9, 0.52], gap=0.1) == [0.5, 0.9, pytest.approx(0.6)]


def test_accuracy_labels_keep_clear_of_the_chance_line():
    ax = accuracy_figure({"batch@1": 0.1, "ema": 0.9}, chance=0.1).axes[0]
    label = next(t for t in ax.texts if t.get_text() == "0.100")
    assert label.xy == (0.1, 0) and label.xyann[0] > 0 and label.get_bbox_patch() is not None
