"""The audit page: flagged layers first, the audit's own numbers in the sentences, in one
format; a variance-ratio axis readable over the data's range; flags explained; the layers not
audited listed."""

from __future__ import annotations

import importlib
import re

import pytest

torch = pytest.importorskip("torch")

from bnstats.report.audit_figure import FONT_SIZE, audit_figure, ratio_ticks  # noqa: E402
from bnstats.report.audit_page import (  # noqa: E402
    AUDIT_PAGE,
    FLAG_MEANINGS,
    audit_report_html,
    format_number,
    ordered_layers,
    write_audit_report,
)
from bnstats.torch import audit  # noqa: E402
from bnstats.torch.audit import START_STILL_WEIGHS  # noqa: E402
from tests.report.test_browser import browser, load_problems  # noqa: E402, F401 (fixture)
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
    assert f"{format_number(worst['mean_shift']['worst'])} standard deviations" in page
    layer_table = page[page.index("<table>") : page.index("</table>")]
    rows = re.findall(r"<tr><td>([^<]+)</td>", layer_table)
    assert rows[0] == "stem.1" and len(rows) == 6


def test_written_atomically(report, tmp_path):
    path = write_audit_report(report, tmp_path / "out")
    assert path.name == AUDIT_PAGE and [p.name for p in path.parent.iterdir()] == [AUDIT_PAGE]


def test_figure_has_a_bar_per_layer_and_panel(report):
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


def _layer(name: str, ratio_mean: float, ratio_worst: float, flags=()) -> dict:
    """One layer of an audit's ``to_dict()``, with the variance ratios given."""
    return {
        "name": name,
        "kind": "BatchNorm2d",
        "flags": list(flags),
        "mean_shift": {"mean": 0.1, "worst": 0.3, "channel": 0},
        "var_ratio": {"mean": ratio_mean, "worst": ratio_worst, "channel": 0},
        "kl": {"mean": 0.01, "worst": 0.02, "channel": 0},
    }


def _ratio_axis(layers):
    """The variance-ratio Axes of the figure, unsaved: its ticks, labels and limits."""
    _, ratio_ax = audit_figure(layers).axes
    ticks = [float(t) for t in ratio_ax.get_xticks()]
    labels = [label.get_text() for label in ratio_ax.get_xticklabels()]
    return ratio_ax, ticks, labels


@pytest.mark.parametrize(
    ("ratios", "least_ticks"),
    [
        ([(0.95, 0.9), (1.1, 1.37), (1.02, 1.05)], 4),  # the issue's case: 0.9 to 1.37
        ([(0.998, 0.995), (1.001, 1.004)], 3),  # all within half a percent of 1
        ([(0.6, 0.4), (1.2, 1.5)], 4),  # a factor of a few
        ([(1.5, 2.1), (11.8, 19.9), (6.6, 10.3)], 4),  # over a decade
        ([(1e-4, 1e-5), (30.0, 2e3)], 4),  # eight decades
    ],
)
def test_ratio_axis_is_readable_across_the_data(ratios, least_ticks):
    """Every drawn ratio lies inside the axis, no farther from a labelled tick than two ticks
    are from each other; 1 is a tick; the labels are distinct and in one format."""
    layers = [_layer(f"bn{i}", mean, worst) for i, (mean, worst) in enumerate(ratios)]
    ratio_ax, ticks, labels = _ratio_axis(layers)
    assert ratio_ax.get_xscale() == "log"
    low, high = ratio_ax.get_xlim()
    values = [v for pair in ratios for v in pair]
    assert low < min(values) and max(values) < high
    assert all(low <= t <= high for t in ticks)
    assert least_ticks <= len(ticks) <= 10 and 1.0 in ticks
    widest_gap = max(b / a for a, b in zip(ticks[:-1], ticks[1:], strict=True))
    assert ticks[0] / min(values) <= widest_gap and max(values) / ticks[-1] <= widest_gap
    assert len(set(labels)) == len(labels) and all(labels)
    assert [float(label) for label in labels] == pytest.approx(ticks, rel=1e-9)
    assert ratio_ax.xaxis.get_minor_locator().tick_values(low, high) == []
    if max(values) / min(values) < 10:
        decimals = {len(label.partition(".")[2]) for label in labels}
        assert len(decimals) == 1, f"one format: {labels}"


def test_ratio_ticks_for_the_issue_range_are_round_tenths():
    ticks, labels = ratio_ticks(0.88, 1.4)
    assert labels == ["0.9", "1.0", "1.1", "1.2", "1.3", "1.4"]
    assert ticks == pytest.approx([0.9, 1.0, 1.1, 1.2, 1.3, 1.4])


def test_figure_text_is_large_and_the_legend_covers_no_data(report):
    """Tick labels, axis labels and the legend at FONT_SIZE; the legend sits above the panels
    (a figure legend), so no dot is hidden under it."""
    assert FONT_SIZE >= 12
    fig = audit_figure(ordered_layers(report.to_dict()["layers"]))
    for ax in fig.axes:
        assert ax.get_legend() is None
        assert ax.xaxis.label.get_fontsize() == FONT_SIZE
        labels = ax.get_xticklabels() + ax.get_yticklabels()
        assert labels and all(label.get_fontsize() == FONT_SIZE for label in labels)
    (legend,) = fig.legends
    texts = [text.get_text() for text in legend.get_texts()]
    assert texts == ["mean over channels", "flagged layer", "worst channel"]
    flagged_only = audit_figure([_layer("bn", 1.0, 1.2, flags=["never_updated"])])
    texts = [text.get_text() for text in flagged_only.legends[0].get_texts()]
    assert texts == ["mean over channels (flagged layers)", "worst channel"]
    assert all(text.get_fontsize() == FONT_SIZE for text in legend.get_texts())


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        (0.01209, "0.012"),
        (-0.9178, "-0.918"),
        (11.84, "11.840"),
        (0.0, "0.000"),
        (2e-5, "< 0.001"),
        (-2e-5, "> -0.001"),
        (None, "n/a"),
        (float("inf"), "n/a"),
    ],
)
def test_one_number_format(value, shown):
    assert format_number(value) == shown


def test_every_table_number_has_the_same_decimals(report):
    page = audit_report_html(report)
    cells = re.findall(r'<td class="num">([^<]*)</td>', page)
    assert len(cells) == 6 * 6
    assert all(re.fullmatch(r"-?\d+\.\d{3}|n/a|&lt; 0\.001|&gt; -0\.001", c) for c in cells), cells
    ratio = ordered_layers(report.to_dict()["layers"])[0]["var_ratio"]["worst"]
    assert f"ranges to {format_number(ratio)}." in page


def test_every_flag_of_the_audit_is_explained():
    """The page explains exactly the flags the audit raises (its constants, not copies)."""
    audit_module = importlib.import_module("bnstats.torch.audit")  # the name audit: the function
    raised = "NEVER_UPDATED START_STILL_WEIGHS NONFINITE_RUNNING NONPOSITIVE_RUNNING_VAR "
    raised += "NONFINITE_POPULATION NEAR_ZERO_POPULATION_VAR CALLED_MORE_THAN_ONCE "
    raised += "MODEL_IN_TRAINING_MODE"
    assert set(FLAG_MEANINGS) == {getattr(audit_module, name) for name in raised.split()}
    assert all(len(meaning.split()) >= 5 for meaning in FLAG_MEANINGS.values())


def test_start_still_weighs_is_shown_and_explained():
    """A layer updated 10 times with momentum 0.1 (the start weighs 0.9**10 = 0.35) is
    flagged, and the flags table names it beside the explanation."""
    model = scramble_batchnorm(TinyResNet(), seed=3, tracked=1000).eval()
    model.stem[1].num_batches_tracked.fill_(10)
    data = audit(model, image_batches(n_batches=2)).to_dict()
    assert [layer["name"] for layer in data["layers"] if START_STILL_WEIGHS in layer["flags"]] == [
        "stem.1"
    ]
    page = audit_report_html(data)
    flags = page[page.index('<section id="flags">') :]
    first = re.search(r"<p>([^<]*)</p>", flags).group(1)
    assert first.startswith("start_still_weighs, raised on stem.1: the running statistics")
    assert "(1 - momentum)^num_batches_tracked" in first
    assert "1 of 6 layers are flagged: stem.1 (start_still_weighs)" in page


def test_flags_no_layer_raised_are_still_explained(report):
    page = audit_report_html(report)
    flags = re.findall(r"<p>([^<]*)</p>", page[page.index('<section id="flags">') :])
    assert [sentence.partition(",")[0] for sentence in flags] == [
        "never_updated",
        *(flag for flag in FLAG_MEANINGS if flag != "never_updated"),
    ]
    assert flags[0] == f"never_updated, raised on stem.1: {FLAG_MEANINGS['never_updated']}"
    assert (
        f"called_more_than_once, not raised here: {FLAG_MEANINGS['called_more_than_once']}" in flags
    )


def test_a_flag_the_page_does_not_know_is_still_listed(report):
    data = report.to_dict()
    data["layers"][0]["flags"].append("some_new_flag")
    data["flags"] = ["model_in_training_mode"]
    page = audit_report_html(data)
    assert f"some_new_flag, raised on {data['layers'][0]['name']}: a flag" in page
    assert "model_in_training_mode, raised on the model: " in page


def test_layers_not_audited_are_listed():
    class Frozen(torch.nn.Module):
        """A stand-in for torchvision's FrozenBatchNorm2d: fixed buffers, found by name."""

        def __init__(self, n: int) -> None:
            super().__init__()
            for key, value in (("weight", 1), ("bias", 0), ("running_mean", 0), ("running_var", 1)):
                self.register_buffer(key, torch.full((n,), float(value)))

        def forward(self, x):
            return x

    Frozen.__name__ = "FrozenBatchNorm2d"
    model = scramble_batchnorm(TinyResNet(), seed=3, tracked=1000).eval()
    model.frozen = Frozen(8)
    model.unused = torch.nn.BatchNorm2d(4).eval()
    report = audit(model, image_batches(n_batches=2), unreached="keep")
    assert report.fixed == ["frozen"] and report.unreached == ["unused"]
    page = audit_report_html(report)
    assert "Not audited, 1 layer with fixed statistics" in page and ": frozen." in page
    assert "Not audited, 1 BN layer that no forward reached" in page and ": unused." in page
    assert "Not audited" not in audit_report_html(
        audit(scramble_batchnorm(TinyResNet()).eval(), image_batches(n_batches=2))
    )


def test_the_wide_table_scrolls_inside_its_box(report):
    """On a narrow screen the nine columns scroll sideways in their own box (every table of
    the report's pages does: the shared style makes a table its own scrolling box)."""
    page = audit_report_html(report)
    assert "table { display: block; max-width: 100%; overflow-x: auto; }" in page
    assert "<table><caption>Per layer, flagged first" in page


def test_page_in_the_browser_fits_a_narrow_screen(browser, report, tmp_path):  # noqa: F811
    """In headless Chromium the figure loads, nothing is fetched, the console holds no
    error, and at 700 px the page itself never scrolls sideways (only the table's box)."""
    page = write_audit_report(report, tmp_path)
    browser.set_window_size(700, 1200)
    count, problems = load_problems(browser, page)
    assert count == 1 and problems == []
    page_width, view_width, box_width, table_width = browser.execute_script(
        "const box = document.querySelector('#layers table');"
        "return [document.documentElement.scrollWidth, document.documentElement.clientWidth,"
        " box.clientWidth, box.scrollWidth];"
    )
    assert page_width <= view_width
    assert table_width > box_width, "the nine columns are wider than 700 px: the box scrolls"
