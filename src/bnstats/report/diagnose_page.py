"""``bnstats diagnose ... --out DIR``: the diagnosis as a self-contained page.

Three sections: the settings side by side (accuracy and output change, with a bar each), the
findings with their evidence and remedy, and the per-layer effects as bars. The bars are
inline SVG drawn here (no matplotlib, nothing fetched). It reads the report's ``to_dict()``,
so it needs neither torch nor matplotlib.
"""

from __future__ import annotations

import math
from html import escape
from pathlib import Path
from typing import Any

from bnstats.report.audit_page import format_number
from bnstats.report.html import (
    FOOTER,
    Section,
    Table,
    render_page,
    render_table,
    report_data,
    write_page,
)

DIAGNOSE_PAGE = "diagnose.html"
BAR_WIDTH = 320
BAR_HEIGHT = 16
GOOD, BAD, NEUTRAL = "#2b8a3e", "#c92a2a", "#4263eb"


def write_diagnose_report(report: Any, directory: str | Path) -> Path:
    """Write ``diagnose.html`` for ``report`` (a ``DiagnoseReport`` or its ``to_dict()``) into
    ``directory`` (created if missing), atomically; returns its path."""
    page = diagnose_report_html(report)
    return write_page(page, directory, DIAGNOSE_PAGE)


def diagnose_report_html(report: Any) -> str:
    """The diagnosis page as one string."""
    data = report_data(report)
    sections = [
        Section(
            "findings",
            "Findings, most important first",
            finding_sentences(data),
            widget=findings_list(data),
        ),
        Section(
            "settings",
            "The settings side by side",
            setting_sentences(data),
            widget=render_table(settings_table(data)),
        ),
        Section(
            "layers",
            "Each BN layer alone with its population statistics",
            layer_sentences(data),
            widget=layer_bars(data),
        ),
    ]
    return render_page(
        "bnstats diagnose: why eval mode differs from training",
        intro_sentences(data),
        sections,
        footer=FOOTER,
    )


def intro_sentences(data: dict[str, Any]) -> list[str]:
    measured = "accuracy and output change" if data["labelled"] else "output change"
    return [
        f"The model was run in each setting on {data['samples']} test samples ({measured}; "
        f"the output change is the relative RMS change of the outputs against as_is). "
        f"{data['passes']} passes over data in all; the model was left as found.",
        *data.get("notes", []),
    ]


def finding_sentences(data: dict[str, Any]) -> list[str]:
    if not data["findings"]:
        return [
            "Nothing found: no setting beats the model as it is by the thresholds of "
            "docs/diagnose.md (half a point of accuracy, two test predictions, clear of the "
            "test set's noise)."
        ]
    return [f"{len(data['findings'])} finding(s); each remedy runs as printed."]


def findings_list(data: dict[str, Any]) -> str:
    """An ordered list: kind and gain, the evidence, the remedy as code."""
    items = []
    for finding in data["findings"]:
        layers = ", ".join(finding["layers"][:5]) or "-"
        more = len(finding["layers"]) - 5
        if more > 0:
            layers += f" and {more} more"
        items.append(
            f'<li class="finding" data-kind="{escape(finding["kind"])}">'
            f"<strong>{escape(finding['kind'])}</strong>: gain "
            f"{escape(_gain(finding['gain'], data['labelled']))}; layers {escape(layers)}"
            f"<p>{escape(finding['evidence'])}</p>"
            f"<p>Remedy: <code>{escape(finding['remedy'])}</code></p></li>"
        )
    return f"<ol>{''.join(items)}</ol>" if items else ""


def setting_sentences(data: dict[str, Any]) -> list[str]:
    return [
        "as_is: eval mode with the running statistics; recalibrated: exact population "
        "statistics of the training data (recalibrated_eval: the same as eval-mode inference "
        "sees them); batch_statistics: each test batch normalized by itself; "
        "test_statistics: the test data's own population statistics."
    ]


def settings_table(data: dict[str, Any]) -> Table:
    rows = []
    for name, setting in data["settings"].items():
        accuracy = setting["accuracy"]
        rows.append(
            [
                name,
                "-" if accuracy is None else f"{format_number(100 * accuracy)}%",
                format_number(setting["output_change"]),
            ]
        )
    return Table(["setting", "accuracy", "output change"], rows, numeric=(1, 2))


def layer_sentences(data: dict[str, Any]) -> list[str]:
    what = "accuracy gain (points)" if data["labelled"] else "output change"
    sentences = [
        f"Per layer ({data['attribution']}), most important first: the {what} of giving "
        "that layer alone its population statistics, every other layer keeping its own."
    ]
    if data["layers"]:
        top = data["layers"][0]
        sentences.append(
            f"{top['name'] or '(model)'} matters most: output change "
            f"{format_number(top['output_change'])}"
            + (
                ""
                if top["accuracy_gain"] is None
                else f", accuracy {format_number(100 * top['accuracy_gain'])} points"
            )
            + "."
        )
    return sentences


def layer_bars(data: dict[str, Any]) -> str:
    """One SVG row per layer: a bar for the accuracy gain (green up, red down) or, without
    labels, the output change, scaled to the largest."""
    layers = data["layers"]
    key = "accuracy_gain" if data["labelled"] else "output_change"
    values = [_finite(layer[key]) for layer in layers]
    largest = max((abs(v) for v in values), default=0.0) or 1.0
    label_width = 180
    height = BAR_HEIGHT * len(layers) + 4
    width = label_width + BAR_WIDTH + 90
    rows = []
    for i, (layer, value) in enumerate(zip(layers, values, strict=True)):
        y = 2 + i * BAR_HEIGHT
        length = abs(value) / largest * BAR_WIDTH
        color = NEUTRAL if key == "output_change" else (GOOD if value >= 0 else BAD)
        text = format_number(100 * value if key == "accuracy_gain" else value)
        rows.append(
            f'<text x="0" y="{y + 12}" font-size="12">{escape(layer["name"] or "(model)")}</text>'
            f'<rect class="bar" x="{label_width}" y="{y + 2}" width="{length:.1f}" '
            f'height="{BAR_HEIGHT - 4}" fill="{color}"></rect>'
            f'<text x="{label_width + length + 4:.1f}" y="{y + 12}" font-size="12">'
            f"{escape(text)}</text>"
        )
    return (
        f'<svg class="layers" role="img" aria-label="per-layer effects" width="{width}" '
        f'height="{height}" viewBox="0 0 {width} {height}">{"".join(rows)}</svg>'
    )


def _gain(gain: float | None, labelled: bool) -> str:
    if gain is None:
        return "n/a"
    if labelled:
        return f"{format_number(100 * gain)} accuracy points"
    return f"output change {format_number(gain)}"


def _finite(value: float | None) -> float:
    return value if value is not None and math.isfinite(value) else 0.0
