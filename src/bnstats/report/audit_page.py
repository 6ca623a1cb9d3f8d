"""``bnstats audit ... --out DIR``: the audit of a model's BN layers as a self-contained page.

The page shows, per BN layer, the standardized mean shift ``|running_mean - mu| / sqrt(var +
eps)`` and the variance ratio ``(running_var + eps) / (var + eps)`` (mean over channels and
worst channel), flagged layers first, with the full table below. It reads the audit's
``to_dict()``, so it needs matplotlib but not torch.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from bnstats import __version__
from bnstats._files import atomic_write_text
from bnstats.report.demo_report import load_figures
from bnstats.report.html import Image, Section, Table, render_page

AUDIT_PAGE = "audit.html"


def write_audit_report(report: Any, directory: str | Path) -> Path:
    """Write ``audit.html`` for ``report`` (an ``AuditReport`` or its ``to_dict()``) into
    ``directory`` (created if missing), atomically; returns its path."""
    page = audit_report_html(report)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    return atomic_write_text(directory / AUDIT_PAGE, page)


def audit_report_html(report: Any) -> str:
    """The audit page as one string."""
    data = report.to_dict() if hasattr(report, "to_dict") else dict(report)
    layers = ordered_layers(data["layers"])
    load_figures()  # a clear error without matplotlib, before any drawing
    from bnstats.report.audit_figure import audit_figure, png_data_uri

    figure = Image(
        png_data_uri(audit_figure(layers)),
        "Per BN layer: standardized mean shift and variance ratio, flagged layers first",
    )
    section = Section(
        "layers",
        "Running statistics against the data",
        audit_sentences(data, layers),
        image=figure,
        tables=(layer_table(layers),),
    )
    return render_page(
        "bnstats audit: running statistics against the truth",
        intro_sentences(data),
        [section],
        footer=f"Written by bnstats {__version__}. The page is self-contained: it loads nothing.",
    )


def ordered_layers(layers: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Flagged layers first, then by mean KL divergence, largest (or unknown) first."""

    def key(layer: dict[str, Any]) -> tuple[int, float]:
        kl = layer["kl"]["mean"]
        return (0 if layer["flags"] else 1, -(math.inf if kl is None else kl))

    return sorted(layers, key=key)


def intro_sentences(data: dict[str, Any]) -> list[str]:
    samples = data.get("samples")
    seen = f"{data['batches']} batches" + (f" ({samples} samples)" if samples else "")
    sentences = [
        f"Each BN layer's running_mean and running_var were compared, channel by channel, with "
        f"the exact mean and unbiased variance of that layer's inputs over {seen}."
    ]
    if data["flags"]:
        sentences.append("Model-wide flags: " + ", ".join(data["flags"]) + ".")
    return sentences


def audit_sentences(data: dict[str, Any], layers: list[dict[str, Any]]) -> list[str]:
    """What the figure shows, with the audit's own numbers."""
    flagged = [layer for layer in layers if layer["flags"]]
    sentences = [
        "Left: the mean shift in units of the data's standard deviation (0 is perfect). "
        "Right: running variance over the data's variance on a log scale (1 is perfect). "
        "Bars are the mean over channels, dots the worst channel."
    ]
    if flagged:
        names = ", ".join(f"{layer['name']} ({', '.join(layer['flags'])})" for layer in flagged)
        sentences.append(f"{len(flagged)} of {len(layers)} layers are flagged: {names}.")
    else:
        sentences.append(f"None of the {len(layers)} layers is flagged.")
    if layers:
        sentences.append(_largest_difference(layers[0]))
    return sentences


def _largest_difference(worst: dict[str, Any]) -> str:
    """The sentence on the first layer's worst channel; NaN or Inf values said in words."""
    shift, ratio = worst["mean_shift"]["worst"], worst["var_ratio"]["worst"]
    shifted = (
        "by a non-finite amount (NaN or Inf)"
        if shift is None
        else f"by {shift:.3g} standard deviations"
    )
    ranges = "is not finite (NaN or Inf)" if ratio is None else f"ranges to {ratio:.3g}"
    return (
        f"The largest difference is in {worst['name']}: its worst channel "
        f"({worst['mean_shift']['channel']}) is shifted {shifted}, and its variance ratio "
        f"{ranges}. Recalibrating (bnstats recalibrate) replaces the running statistics by "
        "these measured values."
    )


def layer_table(layers: list[dict[str, Any]]) -> Table:
    header = [
        "layer",
        "kind",
        "flags",
        "mean shift (mean)",
        "mean shift (worst)",
        "var ratio (mean)",
        "var ratio (worst)",
        "KL (mean)",
        "KL (worst)",
    ]
    rows = [
        [
            layer["name"],
            layer["kind"],
            ", ".join(layer["flags"]) or "-",
            *(
                _number(layer[key][part])
                for key in ("mean_shift", "var_ratio", "kl")
                for part in ("mean", "worst")
            ),
        ]
        for layer in layers
    ]
    return Table(header, rows, caption="Per layer, flagged first", numeric=range(3, 9))


def _number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4g}"
