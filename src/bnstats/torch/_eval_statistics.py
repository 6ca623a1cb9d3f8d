"""Statistics as eval mode's iterations pass them from one pass to the next: what a pass
measured, as statistics to normalize with (:func:`statistics_of`, :func:`iterate_statistics`),
how far a pass moved them (:func:`movement`), and the batches the later passes go over
(:class:`FirstBatches`)."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from bnstats.torch._layer_pass import Measured
from bnstats.torch._layers import display_name, find_batchnorm_layers, unwrap
from bnstats.torch._level import Level, Statistics

Run = Callable[[Level, Any], Measured]
"""``run(level, batches)``: one pass of the model at ``level`` over ``batches``."""

EVAL_TARGET = 1e-4
"""``mode="eval"`` has converged when its last pass moved no layer's statistics by more
than this (see :func:`movement`)."""


def converged(moved: Mapping[str, float], target: float | None = None) -> bool:
    """True when a pass moved some layer and none by more than ``target``
    (:data:`EVAL_TARGET` when None)."""
    limit = EVAL_TARGET if target is None else target
    return bool(moved) and max(moved.values()) <= limit


class FirstBatches:
    """The first ``count`` batches of ``batches``, iterable again (the later passes of
    ``mode="eval"`` use the batches the first one drew, also when ``tolerance`` stopped it)."""

    def __init__(self, batches: Any, count: int) -> None:
        self.batches, self.count = batches, count

    def __iter__(self) -> Iterator[Any]:
        return itertools.islice(iter(self.batches), self.count)


def statistics_of(measured: Measured) -> Statistics:
    """Every reached layer's population ``(mean, unbiased var)``; NonFiniteStatisticsError
    naming a layer whose statistics are NaN or Inf."""
    statistics = {}
    for moments in measured.reached():
        population = measured.population(moments)
        if population.count < 2:
            raise ValueError(
                f"BN layer {display_name(moments.name)} received {population.count:g} value "
                "per channel over all the batches; its unbiased variance needs 2 or more "
                "(more samples, or a larger max_samples); nothing was written"
            )
        statistics[moments.name] = (population.mean, population.var)
    return statistics


def iterate_statistics(measured: Measured, previous: Statistics) -> Statistics:
    """:func:`statistics_of` for the next pass of an iteration: a layer whose population is
    NaN or Inf, or has no finite batch, keeps its ``previous`` statistics (its buffers where
    it has none); it is not exact yet, and the pass that makes it exact sees finite inputs."""
    statistics = {}
    for moments in measured.reached():
        population = measured.finite_population(moments)
        if population is not None:
            statistics[moments.name] = (population.mean, population.var)
        elif moments.name in previous:
            statistics[moments.name] = previous[moments.name]
    return statistics


def buffer_statistics(model: nn.Module) -> Statistics:
    """Every initialized BN layer's running ``(mean, var)`` now, copied."""
    layers = find_batchnorm_layers(unwrap(model))
    return {
        name: (layer.running_mean.detach().clone(), layer.running_var.detach().clone())
        for name, layer in layers.items()
        if not isinstance(layer.running_mean, nn.parameter.UninitializedTensorMixin)
    }


def movement(estimate: Statistics, final: Measured) -> dict[str, float]:
    """Per reached layer, how far ``final``'s population moved from ``estimate`` (the
    statistics that pass normalized with), :func:`statistics_movement`; inf for a layer
    without an estimate or without finite statistics. One host read."""
    result: dict[str, float] = {}
    measured: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    eps: dict[str, float] = {}
    for moments in final.reached():
        result[moments.name] = math.inf
        population = final.finite_population(moments)
        if population is not None and moments.name in estimate:
            measured[moments.name] = (population.mean, population.var)
            eps[moments.name] = float(moments.layer.eps)
    result.update(statistics_movement(estimate, measured, eps))
    return result


def statistics_movement(
    old: Statistics, new: Statistics, eps: Mapping[str, float]
) -> dict[str, float]:
    """Per layer of ``new`` (each also in ``old``), how far its statistics moved from
    ``old``'s, in units of the layer's output::

        max over channels of  |mean - mean_o| / sqrt(var + eps),  |var - var_o| / (var + eps)

    (``mean, var`` the new statistics; NaN counts inf). One host read."""
    moved: dict[str, torch.Tensor] = {}
    for name, (mean, var) in new.items():
        old_mean, old_var = (v.to(mean) for v in old[name])
        scale = var + eps[name]
        distance = torch.maximum(
            ((mean - old_mean).abs() / scale.sqrt()).max(),
            ((var - old_var).abs() / scale).max(),
        )
        moved[name] = torch.nan_to_num(distance, nan=math.inf)
    if not moved:
        return {}
    device = next(iter(moved.values())).device
    numbers = torch.stack([v.to(device) for v in moved.values()]).tolist()
    return dict(zip(moved, numbers, strict=True))
