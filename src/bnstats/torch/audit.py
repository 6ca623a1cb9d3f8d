"""How far each BN layer's running statistics are from the truth on some data.

For every BN layer, ``audit`` measures the population ``mu`` and unbiased ``var`` of the
layer's input over ``batches`` (the pass of :func:`bnstats.torch.recalibrate`, writing
nothing) and compares them, channel by channel, with the stored ``running_mean`` and
``running_var``. Variances enter as ``var + eps``, what the layer divides by::

    mean_shift = |running_mean - mu| / sqrt(var + eps)
    var_ratio  = (running_var + eps) / (var + eps)
    kl         = KL(N(mu, var + eps) || N(running_mean, running_var + eps))
               = 0.5 * (log(var_ratio) + 1 / var_ratio * (1 + mean_shift**2) - 1)

Each layer also carries the precision of the population estimate: per channel the standard
errors of ``mu`` and ``var`` from the spread between batches
(:meth:`bnstats.stats.BatchSpread.standard_errors`) and the worst channel's relative
standard error (``relative_error``: the larger of ``se_mean / sqrt(var)`` and
``se_var / var``). A shift or ratio smaller than a few standard errors is noise of the audit
data, not staleness of the running statistics.

``kl`` (in nats) is the divergence of the layer's assumption (the running statistics) from
the data (the population): the expected log-likelihood ratio under the data. Each is
summarised by its mean over channels and its worst channel. Wu & Johnson (2021) show how
stale or noisy running statistics cost accuracy; this names the layers where they do.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from torch import nn

from bnstats._array import to_numpy
from bnstats.torch._layers import is_batchnorm, is_lazy_uninitialized, uninitialized_lazy_error
from bnstats.torch._measure import measure
from bnstats.torch._pass import LayerPass
from bnstats.torch._ranks import Group
from bnstats.torch.options import Forward, PassOptions

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
    """The audit of one BN layer (``name`` is its qualified module name)."""

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
            "samples": _json_number(self.samples),
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


def audit(
    model: nn.Module,
    batches: Any,
    *,
    forward: Forward | None = None,
    max_samples: int | None = None,
    float64_moments: bool = False,
    group: Group = None,
    nonfinite: Literal["raise", "skip"] = "skip",
    unreached: Literal["raise", "keep"] = "raise",
    mode: Literal["train", "eval"] = "train",
    tolerance: float | None = None,
    progress: bool | None = None,
) -> AuditReport:
    """Compare every BN layer's running statistics with the population statistics on ``batches``.

    The population ``mu`` and unbiased ``var`` are measured exactly as
    :func:`bnstats.torch.recalibrate` would store them (same single pass, same keyword
    ``options``: see :class:`bnstats.torch.PassOptions`), and nothing is written: the model's
    state dict, modes, momenta and hooks are left exactly as found. In a group the population
    statistics are those of all ranks' batches together, compared with each rank's own running
    statistics. ``mode="eval"`` compares against the population statistics as eval-mode
    inference sees them (each layer's input with every BN layer before it normalizing with
    its own final statistics; see :func:`bnstats.torch.recalibrate`), ``mode="train"`` (the
    default) against those of the single pass.

    Flags per layer: ``never_updated`` (``num_batches_tracked == 0``, or the buffers still
    exactly 0 and 1), ``start_still_weighs`` (an EMA whose initial 0 and 1 still weigh
    ``(1 - momentum)**num_batches_tracked`` > 1 % and the statistics sit closer to that blend
    of 0, 1 and the population than to the population itself),
    ``nonfinite_running_stats``,
    ``nonpositive_running_var``, ``nonfinite_population_stats`` (some batch brought NaN or
    Inf: by default such batches are left out of the population and the layer is flagged;
    ``nonfinite="raise"`` fails instead),
    ``near_zero_population_var`` (a channel whose population variance is below ``eps``),
    ``called_more_than_once`` (one forward used the module several times). Model flag:
    ``model_in_training_mode``. Layers with fixed statistics and (``unreached="keep"``) layers
    no forward reached are listed in ``fixed`` and ``unreached``. Raises ``ValueError`` for an
    uninitialized ``LazyBatchNorm*`` (measuring would initialize it).
    """
    options = PassOptions.pick(locals())  # nonfinite="skip": NaN batches are flagged
    measured = measure(model, batches, options, tool="audit", check=_check_initialized)
    layers = [
        _audit_layer(m, measured.skipped.get(m.name, 0), measured.finite_batches(m))
        for m in measured.layers.values()
        if m.name not in measured.unreached
    ]
    flags = [MODEL_IN_TRAINING_MODE] if _in_training_mode(model) else []
    sizes = measured.batch_sizes
    samples = None if any(size is None for size in sizes) else int(sum(sizes))
    return AuditReport(
        layers=layers,
        flags=flags,
        batches=len(sizes),
        samples=samples,
        fixed=list(measured.fixed),
        unreached=list(measured.unreached),
    )


def _check_initialized(model: nn.Module) -> None:
    for name, module in model.named_modules():
        if is_lazy_uninitialized(module):
            raise ValueError(uninitialized_lazy_error(name, module) + " or recalibrate first")


def _in_training_mode(model: nn.Module) -> bool:
    return model.training or any(m.training for m in model.modules() if is_batchnorm(m))


def _audit_layer(moments: LayerPass, skipped: int, finite_batches: int) -> LayerAudit:
    layer = moments.layer
    eps = float(layer.eps)
    population = moments.population
    running_mean = to_numpy(layer.running_mean)
    running_var = to_numpy(layer.running_var)
    if finite_batches:
        mu, var = to_numpy(population.mean), to_numpy(population.var)
    else:  # every batch left out for NaN or Inf: no population to compare with
        mu = var = np.full(int(layer.num_features), np.nan)
    with np.errstate(all="ignore"):
        mean_shift = np.abs(running_mean - mu) / np.sqrt(var + eps)
        var_ratio = (running_var + eps) / (var + eps)
        kl = 0.5 * (np.log(var_ratio) + (1.0 + mean_shift**2) / var_ratio - 1.0)
        log_ratio = np.abs(np.log(var_ratio))
    tracked = None if layer.num_batches_tracked is None else int(layer.num_batches_tracked)
    near_zero = [int(c) for c in np.flatnonzero(var < eps)]
    se_mean, se_var = moments.standard_errors(finite_batches)
    return LayerAudit(
        name=moments.name,
        kind=type(layer).__name__,
        num_features=int(layer.num_features),
        num_batches_tracked=tracked,
        samples=float(population.count),
        calls_per_forward=moments.max_calls_per_forward,
        mean_shift=_summary(mean_shift, mean_shift),
        var_ratio=_summary(var_ratio, log_ratio),
        kl=_summary(kl, kl),
        near_zero_var_channels=near_zero,
        flags=_layer_flags(
            moments, running_mean, running_var, mu, var, near_zero, tracked, skipped
        ),
        running_mean=running_mean,
        running_var=running_var,
        population_mean=mu,
        population_var=var,
        mean_standard_error=to_numpy(se_mean),
        var_standard_error=to_numpy(se_var),
        relative_error=float(moments.relative_error(finite_batches)),
    )


def _summary(values: np.ndarray, badness: np.ndarray) -> ChannelSummary:
    """Mean of ``values`` and the value at the channel of largest ``badness`` (NaN largest)."""
    ranked = np.where(np.isnan(badness), np.inf, badness)
    channel = int(np.argmax(ranked))
    return ChannelSummary(float(np.mean(values)), float(values[channel]), channel)


def _start_weight(layer: nn.Module, tracked: int | None) -> float:
    """``(1 - momentum)**t``: what the initial 0 and 1 still weigh in an EMA's buffers after
    ``t`` updates (0 for the cumulative average and the bias-corrected EMA, which drop them)."""
    momentum = getattr(layer, "momentum", None)
    estimator = getattr(layer, "estimator", None)
    if momentum is None or tracked is None or getattr(estimator, "debias", False):
        return 0.0
    return (1.0 - float(momentum)) ** tracked


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
    moments: LayerPass,
    running_mean: np.ndarray,
    running_var: np.ndarray,
    mu: np.ndarray,
    var: np.ndarray,
    near_zero: list[int],
    tracked: int | None,
    skipped: int,
) -> list[str]:
    flags = []
    if tracked == 0 or (np.all(running_mean == 0) and np.all(running_var == 1)):
        flags.append(NEVER_UPDATED)
    elif (weight := _start_weight(moments.layer, tracked)) > START_WEIGHT_LIMIT and _start_shows(
        running_mean, running_var, mu, var, float(moments.layer.eps), weight
    ):
        flags.append(START_STILL_WEIGHS)
    if not (np.isfinite(running_mean).all() and np.isfinite(running_var).all()):
        flags.append(NONFINITE_RUNNING)
    if np.any(running_var <= 0):
        flags.append(NONPOSITIVE_RUNNING_VAR)
    if skipped or not (np.isfinite(mu).all() and np.isfinite(var).all()):
        flags.append(NONFINITE_POPULATION)
    if near_zero:
        flags.append(NEAR_ZERO_POPULATION_VAR)
    if moments.max_calls_per_forward > 1:
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
        f"shift = |running_mean - mu| / sqrt(var + eps); var ratio = (running_var + eps) / "
        f"(var + eps); KL = {KL_DIRECTION}; rel. s.e. = the population estimate's worst "
        "relative standard error (spread between batches)",
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


__all__ = ["AuditReport", "ChannelSummary", "LayerAudit", "audit"]
