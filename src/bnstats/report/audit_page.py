"""``bnstats audit ... --out DIR``: the audit of a model's BN layers as a self-contained page.

The page shows, per BN layer, the standardized mean shift ``|running_mean - mu| / sqrt(var +
eps)`` and the variance ratio ``(running_var + eps) / (var + eps)`` (mean over channels and
worst channel), flagged layers first, with the full table below, what each flag means, and
the layers not audited (fixed statistics; BN layers no forward reached). Every number is
written one way, :func:`format_number`. It reads the audit's ``to_dict()``, so it needs
matplotlib but not torch.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from bnstats.report.demo_report import load_figures
from bnstats.report.html import (
    FOOTER,
    Image,
    Section,
    Table,
    render_page,
    render_table,
    report_data,
    write_page,
)

AUDIT_PAGE = "audit.html"

DECIMALS = 3
"""Every number on the page has this many decimals (the table's columns line up)."""

FLAG_MEANINGS = {
    "never_updated": "num_batches_tracked is 0, or the buffers are still exactly 0 and 1: the "
    "layer never saw a training batch, so it normalizes with the initial values.",
    "start_still_weighs": "the running statistics are an EMA that starts at 0 (mean) and 1 "
    "(variance); after num_batches_tracked updates with its momentum, that start still weighs "
    "(1 - momentum)^num_batches_tracked, more than 1%, and the statistics sit closer to that "
    "blend of 0, 1 and the data than to the data: too few updates to forget the start (a "
    "short run, a small momentum).",
    "nonfinite_running_stats": "running_mean or running_var holds NaN or Inf.",
    "nonpositive_running_var": "running_var has a channel at or below 0.",
    "nonfinite_population_stats": "some batch brought NaN or Inf into this layer; such batches "
    "are left out of the data's statistics.",
    "near_zero_population_var": "a channel's variance on the data is below eps: the channel is "
    "(nearly) constant, so its ratio says little.",
    "called_more_than_once": "one forward uses the module several times, so its running "
    "statistics mix different inputs.",
    "model_in_training_mode": "the model (or a BN layer) was in training mode: a forward "
    "normalizes with the batch's own statistics and updates the running ones; call eval().",
}
"""Each flag of ``bnstats.torch.audit`` in plain words (the model-wide flag last)."""


def write_audit_report(report: Any, directory: str | Path) -> Path:
    """Write ``audit.html`` for ``report`` (an ``AuditReport`` or its ``to_dict()``) into
    ``directory`` (created if missing), atomically; returns its path."""
    page = audit_report_html(report)
    return write_page(page, directory, AUDIT_PAGE)


def audit_report_html(report: Any) -> str:
    """The audit page as one string."""
    data = report_data(report)
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
        widget=render_table(layer_table(layers)),
    )
    flags = Section("flags", "What the flags mean", flag_sentences(data, layers))
    return render_page(
        "bnstats audit: running statistics against the truth",
        intro_sentences(data),
        [section, flags],
        footer=FOOTER,
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
    return sentences + not_audited_sentences(data)


def not_audited_sentences(data: dict[str, Any]) -> list[str]:
    """The layers the audit found and did not measure, by name."""
    fixed = data.get("fixed_statistics_layers") or []
    unreached = data.get("unreached_layers") or []
    sentences = []
    if fixed:
        sentences.append(
            f"Not audited, {_count(fixed, 'layer')} with fixed statistics (a frozen batch "
            f"norm, whose buffers no training changes and recalibrate leaves alone): "
            f"{_names(fixed)}."
        )
    if unreached:
        sentences.append(
            f"Not audited, {_count(unreached, 'BN layer')} that no forward reached with "
            f"these batches, so there is nothing to compare with: {_names(unreached)}."
        )
    return sentences


def _count(names: list[str], noun: str) -> str:
    return f"{len(names)} {noun}" + ("" if len(names) == 1 else "s")


def _names(names: list[str]) -> str:
    return ", ".join(name or "(model)" for name in names)


def audit_sentences(data: dict[str, Any], layers: list[dict[str, Any]]) -> list[str]:
    """What the figure shows, with the audit's own numbers."""
    flagged = [layer for layer in layers if layer["flags"]]
    sentences = [
        "Left: the mean shift in units of the data's standard deviation (0 is perfect). "
        "Right: running variance over the data's variance on a log scale (1 is perfect). "
        "Bars are the mean over channels, dots the worst channel; flagged layers are red, "
        "and the section below the table says what each flag means."
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
        else f"by {format_number(shift)} standard deviations"
    )
    ranges = "is not finite (NaN or Inf)" if ratio is None else f"ranges to {format_number(ratio)}"
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
                format_number(layer[key][part])
                for key in ("mean_shift", "var_ratio", "kl")
                for part in ("mean", "worst")
            ),
        ]
        for layer in layers
    ]
    return Table(header, rows, caption="Per layer, flagged first", numeric=range(3, 9))


def flag_sentences(data: dict[str, Any], layers: list[dict[str, Any]]) -> list[str]:
    """One sentence per flag the audit knows (and any other it raised): where it was raised
    and what it means; the raised ones first. Sentences, not a table, so that the long flag
    and buffer names wrap on a narrow screen."""
    where: dict[str, list[str]] = {flag: [] for flag in FLAG_MEANINGS}
    for layer in layers:
        for flag in layer["flags"]:
            where.setdefault(flag, []).append(layer["name"] or "(model)")
    for flag in data["flags"]:
        where.setdefault(flag, []).append("the model")
    raised = [flag for flag, names in where.items() if names]
    quiet = [flag for flag, names in where.items() if not names]
    return [
        f"{flag}, {f'raised on {_names(where[flag])}' if where[flag] else 'not raised here'}: "
        f"{FLAG_MEANINGS.get(flag, 'a flag this page has no explanation for.')}"
        for flag in raised + quiet
    ]


def format_number(value: float | None) -> str:
    """The page's one number format: :data:`DECIMALS` decimals (``0.012``, ``-0.918``,
    ``11.840``); a value too small for them ``< 0.001`` (or ``> -0.001``), never a false 0;
    ``n/a`` for a non-finite value (``None`` in the audit's ``to_dict()``)."""
    if value is None or not math.isfinite(value):
        return "n/a"
    smallest = 10.0**-DECIMALS
    if value != 0 and abs(value) < smallest / 2:
        return f"< {smallest:.{DECIMALS}f}" if value > 0 else f"> -{smallest:.{DECIMALS}f}"
    return f"{value:.{DECIMALS}f}"
