"""An audit's report, whatever the framework: per BN layer, the stored statistics against the
population measured on some data, summarised, flagged, ranked worst first, as a table or a dict.

NumPy only (the torch, Keras and Flax audits fill it). Variances enter as ``var + eps``, what
the layer divides by::

    mean_shift = |running_mean - mu| / sqrt(var + eps)
    var_ratio  = (running_var + eps) / (var + eps)
    kl         = KL(N(mu, var + eps) || N(running_mean, running_var + eps))
               = 0.5 * (log(var_ratio) + 1 / var_ratio * (1 + mean_shift**2) - 1)

``running_mean`` and ``running_var`` are the layer's stored statistics under any framework's
names (Keras' ``moving_mean``/``moving_variance``, Flax's ``mean``/``var``), ``mu`` and
``var`` the population's, in the variance the framework stores (unbiased for torch, over all
N values for Keras and Flax).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

NEVER_UPDATED = "never_updated"
NONFINITE_RUNNING = "nonfinite_running_stats"
NONPOSITIVE_RUNNING_VAR = "nonpositive_running_var"
NONFINITE_POPULATION = "nonfinite_population_stats"
NEAR_ZERO_POPULATION_VAR = "near_zero_population_var"
CALLED_MORE_THAN_ONCE = "called_more_than_once"
START_STILL_WEIGHS = "start_still_weighs"
START_WEIGHT_LIMIT = 0.01
"""``start_still_weighs``: an EMA whose initial 0 and 1 still weigh more than this."""
MODEL_IN_TRAINING_MODE = "model_in_training_mode"

KL_DIRECTION = "KL(N(population) || N(running)) per channel, in nats"


@dataclass(frozen=True)
class ChannelSummary:
    """A per-channel quantity summarised: its ``mean`` over channels, its ``worst`` value and
    the ``channel`` where the worst occurs."""

    mean: float
    worst: float
    channel: int


@dataclass
class LayerAudit:
    """The audit of one BN layer (``name`` is its qualified module name).

    ``samples`` is the values per channel the population statistics were measured on (rows
    times spatial positions; ``"values_per_channel"`` in :meth:`to_dict`), where
    :attr:`AuditReport.samples` counts rows. ``var_ratio.worst`` is the channel farthest
    from 1 either way (largest ``|log(var_ratio)|``), so it may lie below the mean."""

    name: str
    kind: str
    num_features: int
    num_batches_tracked: int | None
    samples: float
    calls_per_forward: int
    mean_shift: ChannelSummary
    var_ratio: ChannelSummary
    kl: ChannelSummary
    near_zero_var_channels: list[int]
    flags: list[str]
    running_mean: np.ndarray = field(repr=False)
    running_var: np.ndarray = field(repr=False)
    population_mean: np.ndarray = field(repr=False)
    population_var: np.ndarray = field(repr=False)
    mean_standard_error: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0))
    var_standard_error: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0))
    relative_error: float = math.inf

    @property
    def score(self) -> float:
        """What "worst" sorts by: the mean KL over channels (NaN counts as infinite)."""
        return math.inf if math.isnan(self.kl.mean) else self.kl.mean

    def to_dict(self, per_channel: bool = False) -> dict[str, Any]:
        """A JSON-serialisable dict (non-finite numbers become None)."""
        record: dict[str, Any] = {
            "name": self.name,
            "kind": self.kind,
            "num_features": self.num_features,
            "num_batches_tracked": self.num_batches_tracked,
            "values_per_channel": _json_number(self.samples),
            "calls_per_forward": self.calls_per_forward,
            "flags": list(self.flags),
            "near_zero_var_channels": list(self.near_zero_var_channels),
            "relative_standard_error": _json_number(self.relative_error),
        }
        for key in ("mean_shift", "var_ratio", "kl"):
            summary: ChannelSummary = getattr(self, key)
            record[key] = {
                "mean": _json_number(summary.mean),
                "worst": _json_number(summary.worst),
                "channel": summary.channel,
            }
        if per_channel:
            keys = ("running_mean", "running_var", "population_mean", "population_var")
            for key in (*keys, "mean_standard_error", "var_standard_error"):
                record[key] = [_json_number(v) for v in getattr(self, key).tolist()]
        return record


@dataclass
class AuditReport:
    """Per-layer audits (``layers``, in model order) and model-wide ``flags``."""

    layers: list[LayerAudit]
    flags: list[str]
    batches: int
    samples: int | None
    fixed: list[str] = field(default_factory=list)
    unreached: list[str] = field(default_factory=list)

    def worst_first(self) -> list[LayerAudit]:
        """The layers sorted by mean KL over channels, largest (or NaN) first."""
        return sorted(self.layers, key=lambda layer: layer.score, reverse=True)

    def to_dict(self, per_channel: bool = False) -> dict[str, Any]:
        """A JSON-serialisable dict; ``per_channel=True`` adds the four per-channel vectors."""
        return {
            "batches": self.batches,
            "samples": self.samples,
            "flags": list(self.flags),
            "fixed_statistics_layers": list(self.fixed),
            "unreached_layers": list(self.unreached),
            "kl_direction": KL_DIRECTION,
            "layers": [layer.to_dict(per_channel) for layer in self.layers],
        }

    def __str__(self) -> str:
        return format_report(self)


@dataclass(frozen=True)
class LayerMeasurement:
    """What a framework's pass measured for one BN layer, as NumPy: everything
    :func:`audit_layer` compares and flags. ``start_weight`` is what an EMA's initial 0 and 1
    still weigh in the stored statistics (0 when unknown or not an EMA); ``skipped`` the
    batches left out for NaN or Inf."""

    name: str
    kind: str
    num_features: int
    tracked: int | None
    samples: float
    calls_per_forward: int
    eps: float
    population_mean: np.ndarray
    population_var: np.ndarray
    mean_standard_error: np.ndarray
    var_standard_error: np.ndarray
    relative_error: float
    start_weight: float = 0.0
    skipped: int = 0


def audit_layer(
    measured: LayerMeasurement, running_mean: np.ndarray, running_var: np.ndarray
) -> LayerAudit:
    """The :class:`LayerAudit` of one layer: its stored ``running_mean`` and ``running_var``
    against the population in ``measured`` (formulas in the module docstring)."""
    mu, var, eps = measured.population_mean, measured.population_var, measured.eps
    with np.errstate(all="ignore"):
        mean_shift = np.abs(running_mean - mu) / np.sqrt(var + eps)
        var_ratio = (running_var + eps) / (var + eps)
        kl = 0.5 * (np.log(var_ratio) + (1.0 + mean_shift**2) / var_ratio - 1.0)
        log_ratio = np.abs(np.log(var_ratio))
    near_zero = [int(c) for c in np.flatnonzero(var < eps)]
    return LayerAudit(
        name=measured.name,
        kind=measured.kind,
        num_features=measured.num_features,
        num_batches_tracked=measured.tracked,
        samples=float(measured.samples),
        calls_per_forward=measured.calls_per_forward,
        mean_shift=_summary(mean_shift, mean_shift),
        var_ratio=_summary(var_ratio, log_ratio),
        kl=_summary(kl, kl),
        near_zero_var_channels=near_zero,
        flags=_layer_flags(measured, running_mean, running_var, near_zero),
        running_mean=running_mean,
        running_var=running_var,
        population_mean=mu,
        population_var=var,
        mean_standard_error=measured.mean_standard_error,
        var_standard_error=measured.var_standard_error,
        relative_error=float(measured.relative_error),
    )


def _summary(values: np.ndarray, badness: np.ndarray) -> ChannelSummary:
    """Mean of ``values`` and the value at the channel of largest ``badness`` (NaN largest)."""
    ranked = np.where(np.isnan(badness), np.inf, badness)
    channel = int(np.argmax(ranked))
    return ChannelSummary(float(np.mean(values)), float(values[channel]), channel)


def _start_shows(
    running_mean: np.ndarray,
    running_var: np.ndarray,
    mu: np.ndarray,
    var: np.ndarray,
    eps: float,
    weight: float,
) -> bool:
    """True when the running statistics look like an EMA whose start still weighs ``weight``:
    closer to ``(weight * 0 + (1 - weight) * mu, weight * 1 + (1 - weight) * var)`` than to
    the population ``(mu, var)``, summed over channels in the layer's own units::

        distance(m, v) = sum((running_mean - m)**2 / (var + eps))
                       + sum(log((running_var + eps) / (v + eps))**2)

    A layer recalibrated on other data (``num_batches_tracked`` small, statistics off) is not
    closer to that blend, so it is not flagged."""

    def distance(mean: np.ndarray, variance: np.ndarray) -> float:
        with np.errstate(all="ignore"):
            shift = (running_mean - mean) ** 2 / (var + eps)
            ratio = np.log((running_var + eps) / (variance + eps)) ** 2
        return float(np.nansum(shift) + np.nansum(ratio))

    blend = ((1.0 - weight) * mu, weight + (1.0 - weight) * var)
    return distance(*blend) < distance(mu, var)


def _layer_flags(
    measured: LayerMeasurement,
    running_mean: np.ndarray,
    running_var: np.ndarray,
    near_zero: list[int],
) -> list[str]:
    mu, var = measured.population_mean, measured.population_var
    flags = []
    if np.all(running_mean == 0) and np.all(running_var == 1):  # the count may be missing
        flags.append(NEVER_UPDATED)
    elif (weight := measured.start_weight) > START_WEIGHT_LIMIT and _start_shows(
        running_mean, running_var, mu, var, measured.eps, weight
    ):
        flags.append(START_STILL_WEIGHS)
    if not (np.isfinite(running_mean).all() and np.isfinite(running_var).all()):
        flags.append(NONFINITE_RUNNING)
    if np.any(running_var <= 0):
        flags.append(NONPOSITIVE_RUNNING_VAR)
    if measured.skipped or not (np.isfinite(mu).all() and np.isfinite(var).all()):
        flags.append(NONFINITE_POPULATION)
    if near_zero:
        flags.append(NEAR_ZERO_POPULATION_VAR)
    if measured.calls_per_forward > 1:
        flags.append(CALLED_MORE_THAN_ONCE)
    return flags


# -- the plain-text table ----------------------------------------------------------------------

_HEADER = (
    "layer",
    "C",
    "tracked",
    "shift mean/max",
    "var ratio mean/worst",
    "KL mean/max",
    "rel. s.e.",
    "flags",
)


_LEGEND = (
    "  shift     = |running_mean - mu| / sqrt(var + eps): mean over channels / max",
    "  var ratio = (running_var + eps) / (var + eps): mean over channels / worst, where worst is",
    "              the channel farthest from 1 either way (so it may lie below the mean)",
    f"  KL        = {KL_DIRECTION}: mean / max",
    "  rel. s.e. = the population estimate's worst relative standard error (spread of batches)",
)
"""The lines under the title that say what each column holds, each under 100 characters."""


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
        _number(layer.relative_error),
        ", ".join(layer.flags),
    )


def format_report(report: AuditReport) -> str:
    """A readable table: one row per BN layer, sorted by mean KL, largest first."""
    samples = "?" if report.samples is None else str(report.samples)
    lines = [
        f"bnstats audit: {len(report.layers)} BN layers, {samples} samples in "
        f"{report.batches} batches; worst layers first",
        *_LEGEND,
    ]
    if report.flags:
        lines.append("model flags: " + ", ".join(report.flags))
    if report.fixed:
        lines.append("layers with fixed statistics (not audited): " + ", ".join(report.fixed))
    if report.unreached:
        lines.append("BN layers no forward reached: " + ", ".join(report.unreached))
    rows = [_HEADER, *(_row(layer) for layer in report.worst_first())]
    widths = [max(len(row[i]) for row in rows) for i in range(len(_HEADER))]
    for row in rows:
        cells = [
            cell.ljust(width) if i in (0, len(row) - 1) else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def _json_number(value: float) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


__all__ = [
    "AuditReport",
    "ChannelSummary",
    "LayerAudit",
    "LayerMeasurement",
    "audit_layer",
    "format_report",
]
