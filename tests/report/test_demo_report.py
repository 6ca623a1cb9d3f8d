"""The demo's report page: every figure, the tables, the run's own numbers, written atomically."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bnstats.demo import accuracy_by_batch_size, chance_level
from bnstats.methods import METHODS
from bnstats.report import (
    REPORT_NAME,
    ReportDependencyError,
    demo_report_html,
    write_demo_report,
)
from bnstats.report import demo_report as demo_report_module
from tests.report.test_html import parse

pytest.importorskip("matplotlib")

SECTIONS = ("settings", "lecture-mean", "lecture-var", "momentum", "accuracy", "batch-size")
FIGURE_SECTIONS = ("lecture-mean", "lecture-var", "accuracy", "batch-size")
"""The sections with a matplotlib figure (the momentum section draws in the browser)."""


def section_text(page: str, anchor: str) -> str:
    start = page.index(f'<section id="{anchor}">')
    return "".join(parse(page[start : page.index("</section>", start)]).text)


def table_rows(page: str, anchor: str) -> list[list[str]]:
    """The text of each body row of the tables in one section."""
    start = page.index(f'<section id="{anchor}">')
    body = page[start : page.index("</section>", start)]
    rows = []
    for chunk in body.split("<tr>")[1:]:
        cells = parse(chunk).text
        rows.append([c for c in cells if c.strip()])
    return rows


def test_page_has_every_section_and_figure(quick_page):
    tags = parse(quick_page).tags
    anchors = [attrs["id"] for tag, attrs in tags if tag == "section"]
    assert anchors == list(SECTIONS)
    images = [attrs for tag, attrs in tags if tag == "img"]
    assert len(images) == 4
    for image in images:
        assert image["src"].startswith("data:image/png;base64,") and len(image["src"]) > 1000
        assert image["alt"]
    for anchor in FIGURE_SECTIONS:
        assert "<img " in quick_page.split(f'<section id="{anchor}">')[1].split("</section>")[0]


def test_accuracy_table_holds_every_method(quick_page, quick_run):
    rows = {row[0]: row[1:] for row in table_rows(quick_page, "accuracy")}
    for method in METHODS:
        assert rows[method][0] == f"{quick_run.test_accuracy[method]:.4f}"
    assert rows["chance level"][0] == f"{chance_level(quick_run.dataset):.4f}"


def test_settings_table_is_the_run(quick_page, quick_run):
    rows = dict(table_rows(quick_page, "settings")[1:])
    assert rows["epochs"] == "2" and rows["training steps"] == str(quick_run.history.steps)
    assert rows["network"].startswith("MLP 64-16-8-10")
    assert rows["test rows"] == str(len(quick_run.dataset.X_test))
    assert rows["layer shown"] == "bn1, units 0, 1, 2"


def test_sentences_carry_the_runs_numbers(quick_page, quick_run):
    accuracy, data, history = quick_run.test_accuracy, quick_run.dataset, quick_run.history
    text = section_text(quick_page, "accuracy")
    assert f"(batch@1) gives {accuracy['batch@1']:.3f}" in text
    assert f"chance level, {chance_level(data):.3f}" in text
    assert f"the whole test set as one batch {accuracy['batch@all']:.3f}" in text
    mean = section_text(quick_page, "lecture-mean")
    assert f"one of the {history.steps} training steps" in mean
    assert f"unit 0's EMA is {history.layers['bn1']['ema_mean'][0][0]:.3g}" in mean
    assert f"that batch's μ was {history.layers['bn1']['batch_mean'][0][0]:.3g}" in mean
    by_size = accuracy_by_batch_size(quick_run.net, data, (1, len(data.X_test)))
    sizes = section_text(quick_page, "batch-size")
    assert f"from {by_size[1]:.3f} with batches of 1" in sizes
    assert f"to {by_size[len(data.X_test)]:.3f} with batches of {len(data.X_test)}" in sizes


def test_other_numbers_give_other_sentences(quick_run):
    """Nothing in the page is a remembered result: change the accuracies, the page follows."""
    made_up = {m: 0.5 + i / 100 for i, m in enumerate(METHODS)}
    page = demo_report_html(dataclasses.replace(quick_run, test_accuracy=made_up))
    rows = {row[0]: row[1] for row in table_rows(page, "accuracy")}
    assert all(rows[m] == f"{made_up[m]:.4f}" for m in METHODS)
    text = section_text(page, "accuracy")
    assert f"(batch@1) gives {made_up['batch@1']:.3f}, above chance level" in text
    assert f"the best here is population ({made_up['population']:.3f})" in text


def test_var_section_converts_and_says_so(quick_page, quick_run):
    text = section_text(quick_page, "lecture-var")
    assert "biased variance" in text and "n/(n − 1)" in text
    rows = table_rows(quick_page, "lecture-var")
    last_biased = quick_run.history.layers["bn1"]["batch_var"][-1][0]
    n = quick_run.history.batch_size[-1]
    assert rows[1][:2] == ["0", f"{last_biased * n / (n - 1):.4g}"]


def test_layer_and_units_options(quick_run):
    page = demo_report_html(quick_run, layer="bn2", units=[7, 2])
    assert "Layer bn2, units 7, 2 of its 8" in section_text(page, "lecture-mean")
    population = quick_run.net.batchnorm_layers[1].estimators["population"]
    rows = table_rows(page, "lecture-var")[1:]
    assert [row[0] for row in rows] == ["7", "2"]
    assert rows[0][-1] == f"{population.var[7]:.4g}"


def test_bad_layer_is_one_clear_error(quick_run):
    with pytest.raises(ValueError, match="no BatchNorm layer named 'fc1'.*bn1, bn2"):
        demo_report_html(quick_run, layer="fc1")


def test_write_creates_the_directory_and_only_the_report(quick_run, tmp_path, monkeypatch):
    monkeypatch.setattr(demo_report_module, "demo_report_html", lambda *a, **k: "<p>page</p>")
    path = write_demo_report(quick_run, tmp_path / "new" / "dir")
    assert path == tmp_path / "new" / "dir" / REPORT_NAME
    assert os.listdir(path.parent) == [REPORT_NAME] and path.read_text() == "<p>page</p>"


def test_a_failed_write_leaves_the_old_report_and_no_temp_file(quick_run, tmp_path, monkeypatch):
    (tmp_path / REPORT_NAME).write_text("old")
    monkeypatch.setattr(demo_report_module, "demo_report_html", lambda *a, **k: "new")

    def crash(*args):
        raise OSError("disk full")

    monkeypatch.setattr("bnstats._files.os.replace", crash)
    with pytest.raises(OSError, match="disk full"):
        write_demo_report(quick_run, tmp_path)
    assert os.listdir(tmp_path) == [REPORT_NAME]
    assert (tmp_path / REPORT_NAME).read_text() == "old"


def test_missing_matplotlib_is_one_clear_error(quick_run, tmp_path, monkeypatch):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.delitem(sys.modules, "bnstats.report.figures", raising=False)
    with pytest.raises(ReportDependencyError, match=r"report.html needs matplotlib: pip install"):
        write_demo_report(quick_run, tmp_path)
    assert isinstance(ReportDependencyError("x"), ImportError)
    assert os.listdir(tmp_path) == []


def _fresh_python(code: str) -> str:
    """What ``code`` prints in a new interpreter that imports this checkout's bnstats."""
    src = Path(__file__).resolve().parents[2] / "src"
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(src)},
        check=True,
    )
    return out.stdout.strip()


def test_importing_the_report_does_not_import_matplotlib():
    code = (
        "import sys, bnstats.report, bnstats.cli; "
        "print(sorted(m for m in sys.modules if m.startswith('matplotlib')))"
    )
    assert _fresh_python(code) == "[]"


def test_the_report_does_not_import_the_demo():
    """The page is drawn from a finished run handed to it; the report never runs the demo."""
    code = "import sys, bnstats.report; print('bnstats.demo' in sys.modules)"
    assert _fresh_python(code) == "False"


def test_lecture_numbers_in_the_table_match_the_network(quick_page, quick_run):
    rows = table_rows(quick_page, "lecture-mean")[1:]
    bn1 = quick_run.net.batchnorm_layers[0]
    for row, unit in zip(rows, range(3), strict=True):
        ema, population = bn1.estimators["ema"].mean[unit], bn1.estimators["population"].mean[unit]
        assert row == [
            str(unit),
            f"{quick_run.history.layers['bn1']['batch_mean'][-1][unit]:.4g}",
            f"{ema:.4g}",
            f"{bn1.estimators['ema_debiased'].mean[unit]:.4g}",
            f"{population:.4g}",
        ]
    assert np.isfinite([float(v) for row in rows for v in row]).all()


def test_the_page_names_the_lecture_and_the_normalization(quick_page):
    assert "Batch Norm at Test Time" in quick_page and "deep learning course" in quick_page
    rows = dict(table_rows(quick_page, "settings")[1:])
    assert "Linear → batch norm → ReLU" in rows["network"]


def test_momentum_section_holds_the_grid_and_the_run(quick_page, quick_run):
    from bnstats.report.momentum import GRID, SLIDER_STEPS, slider_position

    rows = table_rows(quick_page, "momentum")[1:]
    accuracy = quick_run.accuracy_by_momentum(GRID)
    assert [row[0] for row in rows] == [f"{m:.4g}" for m in GRID] and len(GRID) == 12
    assert [row[1] for row in rows] == [f"{a:.4f}" for a in accuracy["ema"]]
    assert [row[2] for row in rows] == [f"{a:.4f}" for a in accuracy["ema_debiased"]]
    assert GRID[0] == pytest.approx(1e-3) and GRID[-1] == 1.0
    assert slider_position(1e-3) == 0 and slider_position(1.0) == SLIDER_STEPS
    assert f'data-momentum="{quick_run.config.momentum!r}"' in quick_page
    metas = [a for tag, a in parse(quick_page).tags if tag == "meta"]
    policy = next(a["content"] for a in metas if a.get("http-equiv"))
    assert "script-src 'sha256-" in policy and "default-src 'none'" in policy
