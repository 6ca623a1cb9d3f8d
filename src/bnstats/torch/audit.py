"""How far each BN layer's running statistics are from the truth on some data.

For every BN layer, ``audit`` measures the population ``mu`` and unbiased ``var`` of the
layer's input over ``batches`` (the pass of :func:`bnstats.torch.recalibrate`, writing
nothing) and compares them, channel by channel, with the stored ``running_mean`` and
``running_var``. Variances enter as ``var + eps``, what the layer divides by::

    mean_shift = |running_mean - mu| / sqrt(var + eps)
    var_ratio  = (running_var + eps) / (var + eps)
    kl         = KL(N(mu, var + eps) || N(running_mean, running_var + eps))
               = 0.5 * (log(var_ratio) + 1 / var_ratio * (1 + mean_shift**2) - 1)

``kl`` (in nats) is the divergence of the layer's assumption (the running statistics) from
the data (the population): the expected log-likelihood ratio under the data. Each is
summarised by its mean over channels and its worst channel. Wu & Johnson (2021) show how
stale or noisy running statistics cost accuracy; this names the layers where they do.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from torch import nn

from bnstats._array import to_numpy
from bnstats.torch._across_ranks import collect_across_ranks
from bnstats.torch._audit_table import format_report
from bnstats.torch._layers import Forward, display_name, is_lazy_uninitialized
from bnstats.torch._moments import LayerMoments
from bnstats.torch._ranks import Group

NEVER_UPDATED = "never_updated"
NONFINITE_RUNNING = "nonfinite_running_stats"
NONPOSITIVE_RUNNING_VAR = "nonpositive_running_var"
NONFINITE_POPULATION = "nonfinite_population_stats"
NEAR_ZERO_POPULATION_VAR = "near_zero_population_var"
CALLED_MORE_THAN_ONCE = "called_more_than_once"
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
        }
        for key in ("mean_shift", "var_ratio", "kl"):
            summary: ChannelSummary = getattr(self, key)
            record[key] = {
                "mean": _json_number(summary.mean),
                "worst": _json_number(summary.worst),
                "channel": summary.channel,
            }
        if per_channel:
            for key in ("running_mean", "running_var", "population_mean", "population_var"):
                record[key] = [_json_number(v) for v in getattr(self, key).tolist()]
        return record


@dataclass
class AuditReport:
    """Per-layer audits (``layers``, in model order) and model-wide ``flags``."""

    layers: list[LayerAudit]
    flags: list[str]
    batches: int
    samples: int | None

    def worst_first(self) -> list[LayerAudit]:
        """The layers sorted by mean KL over channels, largest (or NaN) first."""
        return sorted(self.layers, key=lambda layer: layer.score, reverse=True)

    def to_dict(self, per_channel: bool = False) -> dict[str, Any]:
        """A JSON-serialisable dict; ``per_channel=True`` adds the four per-channel vectors."""
        return {
            "batches": self.batches,
            "samples": self.samples,
            "flags": list(self.flags),
            "kl_direction": KL_DIRECTION,
            "layers": [layer.to_dict(per_channel) for layer in self.layers],
        }

    def __str__(self) -> str:
        return format_report(self)


def audit(
    model: nn.Module, batches: Any, *, forward: Forward | None = None, group: Group = None
) -> AuditReport:
    """Compare every BN layer's running statistics with the population statistics on ``batches``.

    The population ``mu`` and unbiased ``var`` are measured exactly as
    :func:`bnstats.torch.recalibrate` would store them (same single pass: BN layers
    normalizing with batch statistics, everything else in eval mode), and nothing is
    written: the model's state dict, modes, momenta and hooks are left exactly as found.

    Flags per layer: ``never_updated`` (``num_batches_tracked == 0``, or the buffers still
    exactly 0 and 1), ``nonfinite_running_stats``, ``nonpositive_running_var``,
    ``nonfinite_population_stats``, ``near_zero_population_var`` (a channel whose population
    variance is below the layer's ``eps``: ``near_zero_var_channels``),
    ``called_more_than_once`` (one forward used the module several times: its inputs mix).
    Model flag: ``model_in_training_mode`` (the model, or a BN layer, is in training mode).

    ``batches``, ``forward`` and ``group`` are as for :func:`~bnstats.torch.recalibrate`: in
    a group the population statistics are those of all ranks' batches together (the same on
    every rank), compared with each rank's own running statistics. Raises ``ValueError`` for
    an uninitialized ``LazyBatchNorm*`` (measuring would initialize it).
    """
    collected = collect_across_ranks(
        model, batches, group=group, forward=forward, check=_check_initialized
    )
    layers = [_audit_layer(moments) for moments in collected.layers.values()]
    flags = [MODEL_IN_TRAINING_MODE] if _in_training_mode(model) else []
    sizes = collected.batch_sizes
    samples = None if any(size is None for size in sizes) else int(sum(sizes))
    return AuditReport(layers=layers, flags=flags, batches=len(sizes), samples=samples)


def _check_initialized(model: nn.Module) -> None:
    for name, module in model.named_modules():
        if is_lazy_uninitialized(module):
            raise ValueError(
                f"layer {display_name(name)} is an uninitialized {type(module).__name__}: it "
                "has no running statistics yet; run one forward (or recalibrate) first"
            )


def _in_training_mode(model: nn.Module) -> bool:
    bn = nn.modules.batchnorm._BatchNorm
    return model.training or any(m.training for m in model.modules() if isinstance(m, bn))


def _audit_layer(moments: LayerMoments) -> LayerAudit:
    layer = moments.layer
    eps = float(layer.eps)
    running_mean = to_numpy(layer.running_mean)
    running_var = to_numpy(layer.running_var)
    mu = to_numpy(moments.mean)
    var = to_numpy(moments.var)
    with np.errstate(all="ignore"):
        mean_shift = np.abs(running_mean - mu) / np.sqrt(var + eps)
        var_ratio = (running_var + eps) / (var + eps)
        kl = 0.5 * (np.log(var_ratio) + (1.0 + mean_shift**2) / var_ratio - 1.0)
        log_ratio = np.abs(np.log(var_ratio))
    tracked = None if layer.num_batches_tracked is None else int(layer.num_batches_tracked)
    near_zero = [int(c) for c in np.flatnonzero(var < eps)]
    return LayerAudit(
        name=moments.name,
        kind=type(layer).__name__,
        num_features=int(layer.num_features),
        num_batches_tracked=tracked,
        samples=float(moments.count),
        calls_per_forward=moments.max_calls_per_forward,
        mean_shift=_summary(mean_shift, mean_shift),
        var_ratio=_summary(var_ratio, log_ratio),
        kl=_summary(kl, kl),
        near_zero_var_channels=near_zero,
        flags=_layer_flags(moments, running_mean, running_var, mu, var, near_zero, tracked),
        running_mean=running_mean,
        running_var=running_var,
        population_mean=mu,
        population_var=var,
    )


def _summary(values: np.ndarray, badness: np.ndarray) -> ChannelSummary:
    """Mean of ``values`` and the value at the channel of largest ``badness`` (NaN largest)."""
    ranked = np.where(np.isnan(badness), np.inf, badness)
    channel = int(np.argmax(ranked))
    return ChannelSummary(float(np.mean(values)), float(values[channel]), channel)


def _layer_flags(
    moments: LayerMoments,
    running_mean: np.ndarray,
    running_var: np.ndarray,
    mu: np.ndarray,
    var: np.ndarray,
    near_zero: list[int],
    tracked: int | None,
) -> list[str]:
    flags = []
    if tracked == 0 or (np.all(running_mean == 0) and np.all(running_var == 1)):
        flags.append(NEVER_UPDATED)
    if not (np.isfinite(running_mean).all() and np.isfinite(running_var).all()):
        flags.append(NONFINITE_RUNNING)
    if np.any(running_var <= 0):
        flags.append(NONPOSITIVE_RUNNING_VAR)
    if not (np.isfinite(mu).all() and np.isfinite(var).all()):
        flags.append(NONFINITE_POPULATION)
    if near_zero:
        flags.append(NEAR_ZERO_POPULATION_VAR)
    if moments.max_calls_per_forward > 1:
        flags.append(CALLED_MORE_THAN_ONCE)
    return flags


def _json_number(value: float) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


__all__ = ["AuditReport", "ChannelSummary", "LayerAudit", "audit"]
