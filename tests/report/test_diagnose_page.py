"""The diagnose page: findings with remedies, settings side by side, a bar per layer, and in
headless Chromium every part loads with no console error and nothing fetched."""

from __future__ import annotations

import copy
import re

import pytest

torch = pytest.importorskip("torch")

import bnstats.torch as bt  # noqa: E402
from bnstats.report.diagnose_page import (  # noqa: E402
    DIAGNOSE_PAGE,
    diagnose_report_html,
    write_diagnose_report,
)
from tests.report.test_browser import browser, load_problems  # noqa: E402, F401 (fixture)
from tests.torch.models import mlp, scramble_batchnorm  # noqa: E402


@pytest.fixture(scope="module")
def report():
    """A model whose second BN layer's statistics are far off, with labels from the model
    with exact statistics (so that recalibrating gives them all back)."""
    generator = torch.Generator().manual_seed(0)
    model = scramble_batchnorm(mlp((16, 24, 12, 4)), seed=1, tracked=1000).eval()
    inputs = [torch.randn(64, 16, generator=generator) for _ in range(4)]
    exact = bt.recalibrate(copy.deepcopy(model), inputs).eval()
    with torch.no_grad():
        batches = [(x, exact(x).argmax(1)) for x in inputs]
    return bt.diagnose(model, batches, progress=False)


def test_page_holds_findings_settings_and_bars(report):
    page = diagnose_report_html(report)
    data = report.to_dict()
    assert data["findings"] and data["findings"][0]["kind"] == "stale_statistics"
    assert 'data-kind="stale_statistics"' in page
    assert "<code>bt.recalibrate(model, batches)</code>" in page
    settings = page[page.index('id="settings"') :]
    assert re.findall(r"<tr><td>([a-z_]+)</td>", settings) == list(data["settings"])
    assert page.count('<rect class="bar"') == len(data["layers"])
    assert "http" not in page.replace("http-equiv", "")


def test_a_healthy_report_says_nothing_was_found():
    data = {
        "samples": 10,
        "labelled": False,
        "passes": 7,
        "attribution": "each of the 1 BN layers alone",
        "settings": {"as_is": {"accuracy": None, "output_change": 0.0}},
        "layers": [{"name": "bn", "accuracy_gain": None, "output_change": 0.001}],
        "findings": [],
        "notes": [],
    }
    assert "Nothing found" in diagnose_report_html(data)


def test_written_atomically(report, tmp_path):
    path = write_diagnose_report(report, tmp_path / "out")
    assert path.name == DIAGNOSE_PAGE and [p.name for p in path.parent.iterdir()] == [DIAGNOSE_PAGE]


def test_page_in_headless_chromium(browser, report, tmp_path):  # noqa: F811
    page = write_diagnose_report(report, tmp_path)
    count, problems = load_problems(browser, page)
    assert problems == [] and count == 0
    bars = browser.execute_script(
        "return Array.from(document.querySelectorAll('svg.layers rect.bar'),"
        " r => r.getBoundingClientRect().width);"
    )
    assert len(bars) == len(report.layers) and max(bars) > 100
    kinds = browser.execute_script(
        "return Array.from(document.querySelectorAll('li.finding'), li => li.dataset.kind);"
    )
    assert kinds == [finding.kind for finding in report.findings]
