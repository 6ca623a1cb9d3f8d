"""The plain-text table of an audit report, worst layers first (no dependency beyond str)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bnstats.torch.audit import AuditReport, LayerAudit

_HEADER = (
    "layer",
    "C",
    "tracked",
    "shift mean/max",
    "var ratio mean/worst",
    "KL mean/max",
    "flags",
)


def _number(value: float) -> str:
    return f"{value:.3g}"


def _row(layer: LayerAudit) -> tuple[str, ...]:
    return (
        layer.name or "<model>",
        str(layer.num_features),
        "-" if layer.num_batches_tracked is None else str(layer.num_batches_tracked),
        f"{_number(layer.mean_shift.mean)} / {_number(layer.mean_shift.worst)}",
        f"{_number(layer.var_ratio.mean)} / {_number(layer.var_ratio.worst)}",
        f"{_number(layer.kl.mean)} / {_number(layer.kl.worst)}",
        ", ".join(layer.flags),
    )


def format_report(report: AuditReport) -> str:
    """A readable table: one row per BN layer, sorted by mean KL, largest first."""
    from bnstats.torch.audit import KL_DIRECTION

    samples = "?" if report.samples is None else str(report.samples)
    lines = [
        f"bnstats audit: {len(report.layers)} BN layers, {samples} samples in "
        f"{report.batches} batches; worst layers first",
        f"shift = |running_mean - mu| / sqrt(var + eps); var ratio = (running_var + eps) / "
        f"(var + eps); KL = {KL_DIRECTION}",
    ]
    if report.flags:
        lines.append("model flags: " + ", ".join(report.flags))
    rows = [_HEADER, *(_row(layer) for layer in report.worst_first())]
    widths = [max(len(row[i]) for row in rows) for i in range(len(_HEADER))]
    for row in rows:
        cells = [
            cell.ljust(width) if i in (0, len(row) - 1) else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)
