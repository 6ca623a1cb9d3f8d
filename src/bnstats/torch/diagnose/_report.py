"""What :func:`bnstats.torch.diagnose` returns: settings, per-layer effects and findings."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from bnstats.torch.diagnose._evaluate import Setting

LEFT_IN_TRAIN_MODE = "left_in_train_mode"
STALE_STATISTICS = "stale_statistics"
DISTRIBUTION_SHIFT = "distribution_shift"
BATCH_DEPENDENCE = "batch_dependence"
FROZEN_STATISTICS = "frozen_statistics"
KINDS = (
    LEFT_IN_TRAIN_MODE,
    STALE_STATISTICS,
    DISTRIBUTION_SHIFT,
    BATCH_DEPENDENCE,
    FROZEN_STATISTICS,
)


@dataclass(frozen=True)
class Finding:
    """One cause: its ``kind``, the ``layers`` involved (most responsible first), the
    ``gain`` its remedy brings on the test data (accuracy, a fraction; without labels the
    relative change of the outputs), the ``evidence`` (one sentence with the numbers) and the
    ``remedy`` (a bnstats call, runnable as printed with the names ``model``, ``batches``,
    ``test_batches`` and ``bt`` of :func:`bnstats.torch.diagnose`'s call)."""

    kind: str
    layers: list[str]
    gain: float
    evidence: str
    remedy: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "layers": list(self.layers),
            "gain": _json_number(self.gain),
            "evidence": self.evidence,
            "remedy": self.remedy,
        }


@dataclass(frozen=True)
class LayerEffect:
    """The effect of giving one BN layer (or its ``group`` of consecutive layers, on large
    models) alone its population statistics, every other layer keeping its own: the change
    of accuracy (``accuracy_gain``, None without labels) and the relative RMS change of the
    outputs (``output_change``), both against ``as_is``."""

    name: str
    kind: str
    accuracy_gain: float | None
    output_change: float
    group: list[str] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "accuracy_gain": self.accuracy_gain,
            "output_change": _json_number(self.output_change),
            "group": None if self.group is None else list(self.group),
        }


@dataclass
class DiagnoseReport:
    """The diagnosis: ``settings`` (name -> :class:`Setting`), ``layers`` (every BN layer,
    most important first), ``findings`` (most important first; empty: nothing found), how the
    layers were attributed (``attribution``), the test ``samples``, whether accuracy was
    measured (``labelled``), the passes over data it took (``passes``) and ``notes``."""

    settings: dict[str, Setting]
    layers: list[LayerEffect]
    findings: list[Finding]
    attribution: str
    samples: int
    labelled: bool
    passes: int
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict (non-finite numbers become None)."""
        return {
            "samples": self.samples,
            "labelled": self.labelled,
            "passes": self.passes,
            "attribution": self.attribution,
            "settings": {name: setting.to_dict() for name, setting in self.settings.items()},
            "layers": [layer.to_dict() for layer in self.layers],
            "findings": [finding.to_dict() for finding in self.findings],
            "notes": list(self.notes),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    def __str__(self) -> str:
        return format_report(self)


def format_report(report: DiagnoseReport) -> str:
    """The settings side by side, the findings with their remedies, the layers."""
    lines = [
        f"bnstats diagnose: {report.samples} test samples, {len(report.layers)} BN layers, "
        f"{report.passes} passes over data",
        "",
        f"{'setting':<20} {'accuracy':>9} {'output change':>14}",
    ]
    for name, setting in report.settings.items():
        accuracy = "-" if setting.accuracy is None else f"{100 * setting.accuracy:.2f}%"
        lines.append(f"{name:<20} {accuracy:>9} {_number(setting.output_change):>14}")
    lines.append("")
    if not report.findings:
        lines.append("findings: none (no cause worth the thresholds in docs/diagnose.md)")
    for rank, finding in enumerate(report.findings, 1):
        lines += [
            f"{rank}. {finding.kind}: gain {format_gain(finding.gain, report.labelled)}",
            f"   {finding.evidence}",
            f"   remedy: {finding.remedy}",
        ]
    lines += ["", f"layers ({report.attribution}), most important first:"]
    gain_header = "acc. gain" if report.labelled else ""
    lines.append(f"  {'layer':<32} {gain_header:>10} {'output change':>14}")
    for layer in report.layers:
        gain = "" if layer.accuracy_gain is None else f"{100 * layer.accuracy_gain:+.2f}"
        lines.append(
            f"  {layer.name or '<model>':<32} {gain:>10} {_number(layer.output_change):>14}"
        )
    lines += [f"note: {note}" for note in report.notes]
    return "\n".join(lines)


def format_gain(gain: float, labelled: bool) -> str:
    """A finding's gain: accuracy points with labels, else the relative output change."""
    if labelled:
        return f"{100 * gain:+.2f} accuracy points"
    return f"output change {_number(gain)}"


def _number(value: float) -> str:
    return f"{value:.3g}" if math.isfinite(value) else "n/a"


def _json_number(value: float | None) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None
