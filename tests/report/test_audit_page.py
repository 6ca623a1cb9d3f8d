"""The audit page: flagged layers first, the audit's own numbers in the sentences."""

from __future__ import annotations

import re

import pytest

torch = pytest.importorskip("torch")

from bnstats.report.audit_page import (  # noqa: E402
    AUDIT_PAGE,
    audit_report_html,
    ordered_layers,
    write_audit_report,
)
from bnstats.torch import audit  # noqa: E402
from tests.torch.models import TinyResNet, image_batches, scramble_batchnorm  # noqa: E402


@pytest.fixture(scope="module")
def report():
    model = scramble_batchnorm(TinyResNet(), seed=3, tracked=1000).eval()
    model.stem[1].reset_running_stats()  # never updated: flagged
    return audit(model, image_batches(n_batches=2))


def test_flagged_layers_come_first(report):
    layers = ordered_layers(report.to_dict()["layers"])
    assert layers[0]["name"] == "stem.1" and "never_updated" in layers[0]["flags"]
    unflagged = [layer for layer in layers if not layer["flags"]]
    kls = [layer["kl"]["mean"] for layer in unflagged]
    assert kls == sorted(kls, reverse=True)


def test_page_holds_the_figure_table_and_numbers(report):
    page = audit_report_html(report)
    assert page.count("data:image/png;base64,") == 1
    assert "1 of 6 layers are flagged: stem.1 (never_updated)" in page
    worst = ordered_layers(report.to_dict()["layers"])[0]
    assert f"{worst['mean_shift']['worst']:.3g} standard deviations" in page
    rows = re.findall(r"<tr><td>([^<]+)</td>", page)
    assert rows[0] == "stem.1" and len(rows) == 6


def test_written_atomically(report, tmp_path):
    path = write_audit_report(report, tmp_path / "out")
    assert path.name == AUDIT_PAGE and [p.name for p in path.parent.iterdir()] == [AUDIT_PAGE]


def test_figure_has_a_bar_per_layer_and_panel(report):
    from bnstats.report.audit_figure import audit_figure

    layers = ordered_layers(report.to_dict()["layers"])
    fig = audit_figure(layers)
    shift_ax, ratio_ax = fig.axes
    assert len(shift_ax.patches) == len(layers) == len(ratio_ax.patches)
    assert ratio_ax.get_xscale() == "log"
    top = max(shift_ax.get_yticklabels(), key=lambda label: label.get_position()[1])
    assert top.get_text() == layers[0]["name"], "the first (flagged) layer is drawn on top"


def test_a_nan_running_var_is_said_in_words(tmp_path):
    model = scramble_batchnorm(TinyResNet(), seed=3).eval()
    model.stem[1].running_var[0] = float("nan")
    page = audit_report_html(audit(model, image_batches(n_batches=2)))
    assert "The largest difference is in stem.1" in page
    assert "its variance ratio is not finite (NaN or Inf)" in page
