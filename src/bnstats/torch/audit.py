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
(:meth:`bnstats.precision.BatchSpread.standard_errors`) and the worst channel's relative
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
from typing import Any, Literal

import numpy as np
from torch import nn

from bnstats._array import to_numpy
from bnstats._audit import (  # noqa: F401  (the flags and the table are part of this API)
    CALLED_MORE_THAN_ONCE,
    KL_DIRECTION,
    MODEL_IN_TRAINING_MODE,
    NEAR_ZERO_POPULATION_VAR,
    NEVER_UPDATED,
    NONFINITE_POPULATION,
    NONFINITE_RUNNING,
    NONPOSITIVE_RUNNING_VAR,
    START_STILL_WEIGHS,
    START_WEIGHT_LIMIT,
    AuditReport,
    ChannelSummary,
    LayerAudit,
    LayerMeasurement,
    audit_layer,
    format_report,
)
from bnstats.torch._layer_pass import LayerPass
from bnstats.torch._layers import (
    display_name,
    is_batchnorm,
    is_lazy_uninitialized,
    uninitialized_lazy_error,
)
from bnstats.torch._measure import measure
from bnstats.torch._ranks import Group
from bnstats.torch.options import Forward, PassOptions


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
    mode: Literal["train", "eval", "eval_exact"] = "train",
    tolerance: float | None = None,
    progress: bool | None = None,
    one_batch_bytes: int | None = None,
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

    Flags per layer: ``never_updated`` (the buffers still exactly 0 and 1, whatever
    ``num_batches_tracked`` says), ``start_still_weighs`` (an EMA whose initial 0 and 1 still weigh
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
    """``ValueError`` naming a lazy module with no shape yet: audit's forwards would
    initialize it, and audit changes nothing."""
    for name, module in model.named_modules():
        if not is_lazy_uninitialized(module):
            continue
        if is_batchnorm(module):
            raise ValueError(uninitialized_lazy_error(name, module) + " or recalibrate first")
        raise ValueError(
            f"module {display_name(name)} is an uninitialized {type(module).__name__}: it has "
            "no weights yet, and audit changes nothing in the model (run one forward first)"
        )


def _in_training_mode(model: nn.Module) -> bool:
    return model.training or any(m.training for m in model.modules() if is_batchnorm(m))


def _audit_layer(moments: LayerPass, skipped: int, finite_batches: int) -> LayerAudit:
    layer = moments.layer
    population = moments.population
    tracked = None if layer.num_batches_tracked is None else int(layer.num_batches_tracked)
    se_mean, se_var = moments.standard_errors(finite_batches)
    if finite_batches and population.mean is not None:
        mu, var = to_numpy(population.mean), to_numpy(population.var)
        relative_error = float(moments.relative_error(finite_batches))
    else:  # every batch left out for NaN or Inf: no population to compare with
        mu = var = np.full(int(layer.num_features), np.nan)
        relative_error = math.inf
    measured = LayerMeasurement(
        name=moments.name,
        kind=type(layer).__name__,
        num_features=int(layer.num_features),
        tracked=tracked,
        samples=float(population.count),
        calls_per_forward=moments.max_calls_per_forward,
        eps=float(layer.eps),
        population_mean=mu,
        population_var=var,
        mean_standard_error=to_numpy(se_mean),
        var_standard_error=to_numpy(se_var),
        relative_error=relative_error,
        start_weight=_start_weight(layer, tracked),
        skipped=skipped,
    )
    return audit_layer(measured, to_numpy(layer.running_mean), to_numpy(layer.running_var))


def _start_weight(layer: nn.Module, tracked: int | None) -> float:
    """``(1 - momentum)**t``: what the initial 0 and 1 still weigh in an EMA's buffers after
    ``t`` updates (0 for the cumulative average and the bias-corrected EMA, which drop them,
    and for a schedule of the user's own, whose ``momentum`` is only its next weight)."""
    estimator = getattr(layer, "estimator", None)
    momentum = getattr(layer if estimator is None else estimator, "momentum", None)
    if momentum is None or tracked is None or getattr(estimator, "debias", False):
        return 0.0
    return (1.0 - float(momentum)) ** tracked


__all__ = ["AuditReport", "ChannelSummary", "LayerAudit", "audit"]
