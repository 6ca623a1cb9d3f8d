"""Batch norm's statistics across ``torch.distributed`` ranks: exact, and the same everywhere.

Two things live here:

- :func:`~bnstats.torch.recalibrate`, :func:`~bnstats.torch.audit` and
  :func:`~bnstats.torch.adapt` take ``group=``: with an initialized process group each rank
  passes its own batches, and every rank ends with the statistics of all ranks' batches
  together, bit-identical on every rank. Each layer's ``(count, mean, m2)`` is gathered in
  float64 and merged in rank order with Chan et al.'s (1979) formula
  (:meth:`bnstats.Population.merge`).
- :func:`sync_running_stats`, for models trained with plain BN under
  ``DistributedDataParallel``: each rank's running statistics drift apart (every rank
  normalizes and averages its own batches); this replaces them, on every rank, with their
  pooled estimate.

If any rank fails, every rank raises :class:`RankError` naming the failed ranks and their
errors, after one status exchange and before any data is exchanged: no rank writes anything
(see :mod:`bnstats.torch._ranks`). The tools are documented in ``docs/distributed.md``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from bnstats.stats import Population
from bnstats.torch._layers import (
    cast_buffer,
    find_batchnorm_layers,
    is_lazy_uninitialized,
    layer_label,
    uninitialized_lazy_error,
    unwrap,
    write_buffers,
)
from bnstats.torch._ranks import (
    Group,
    RankError,
    check_same_layers,
    exchange,
    layout_of,
    resolve_group,
    run_and_exchange,
)


def sync_running_stats(
    model: nn.Module, group: Group = None, *, weight: float | None = None
) -> nn.Module:
    """Replace every BN layer's running statistics, on every rank, by their pooled estimate.

    With ``mean_k``, ``var_k`` rank ``k``'s ``running_mean``, ``running_var`` and ``w_k``
    its weight, per channel (the mean and variance of the mixture of the ranks' data)::

        mean = sum(w_k * mean_k) / sum(w_k)
        var  = sum(w_k * var_k) / sum(w_k) + sum(w_k * (mean_k - mean)**2) / sum(w_k)

    The second term is the spread of the ranks' means, which averaging the variances alone
    (timm's ``distribute_bn`` with ``reduce=True``) drops. It is :class:`bnstats.Population`'s
    merge of ``(count, mean, m2) = (w_k, mean_k, w_k * var_k)``, ``var = m2 / count``, in
    float64, rank by rank in rank order, identically on every rank, so the buffers come out
    bit-identical on all ranks; ``num_batches_tracked`` becomes the largest over the ranks.

    ``w_k``: by default each layer's ``num_batches_tracked`` on rank ``k`` (under
    ``DistributedDataParallel`` all ranks take the same steps, so the ranks count equally;
    with ``momentum=None`` it is the number of batches averaged). ``weight=`` gives this
    rank's weight for every layer instead, e.g. the number of samples it saw: every rank
    should then pass one. A layer whose weights sum to 0 over the ranks weighs them equally.

    This is an estimate from running averages. For exact statistics over all ranks' data,
    run :func:`bnstats.torch.recalibrate` with each rank's batches.

    Args:
        model: the model (or ``DistributedDataParallel`` around it), changed in place and
            returned.
        group: ``None`` (default): the default process group when torch.distributed is
            initialized with more than one rank; a ``ProcessGroup``; ``False``. Without a
            group (one process, or ``False``) nothing changes.
        weight: this rank's weight, a finite number >= 0; default ``num_batches_tracked``.

    All ranks must hold the same BN layers. If any rank fails (no BN layer, an uninitialized
    ``LazyBatchNorm*``, NaN or Inf running statistics, a bad ``weight``), every rank raises
    :class:`RankError` naming it and nothing changes anywhere.
    """
    chosen = resolve_group(group)
    if chosen is None:
        return model
    inner = unwrap(model)

    def local() -> tuple[tuple[dict[str, _BatchNorm], list[Any]], Any]:
        own = _check_weight(weight)
        layers = find_batchnorm_layers(inner)
        records = [_record(name, layer, own) for name, layer in layers.items()]
        return (layers, records), (layout_of(layers), own is not None)

    call = {"tool": "sync_running_stats", "weight_given": weight is not None}
    (layers, records), summaries = run_and_exchange(chosen, local, call)
    check_same_layers(chosen, [layout for layout, _ in summaries])
    sizes = [(2, int(layer.num_features), int(layer.num_features)) for layer in layers.values()]
    write_buffers(_pooled_buffers(layers, exchange(chosen, records, sizes)))
    return model


def _check_weight(weight: Any) -> float | None:
    if weight is None:
        return None
    if isinstance(weight, bool) or not isinstance(weight, (int, float)):
        raise TypeError(f"weight must be a number or None, got {type(weight).__name__}")
    if not math.isfinite(weight) or weight < 0:
        raise ValueError(f"weight must be a finite number >= 0, got {weight!r}")
    return float(weight)


def _record(name: str, layer: _BatchNorm, weight: float | None) -> list[Any]:
    """``[[w, num_batches_tracked], running_mean, running_var]`` of one layer, float64."""
    if is_lazy_uninitialized(layer):
        raise ValueError(uninitialized_lazy_error(name, layer))
    mean = layer.running_mean.detach().double().cpu()
    var = layer.running_var.detach().double().cpu()
    if not bool(torch.isfinite(mean).all() & torch.isfinite(var).all()):
        raise ValueError(
            f"{layer_label(name)}: running_mean or running_var holds NaN or Inf; pooling it "
            "would spread it to every rank (recalibrate this layer instead)"
        )
    tracked = float(layer.num_batches_tracked) if layer.num_batches_tracked is not None else 0.0
    return [[tracked if weight is None else weight, tracked], mean, var]


def _pooled_buffers(
    layers: dict[str, _BatchNorm], ranks: list[list[list[torch.Tensor]]]
) -> dict[nn.Module, dict[str, torch.Tensor]]:
    """Each layer's pooled buffers from every rank's records (:func:`_record`), rank order."""
    updates = {}
    for index, (name, layer) in enumerate(layers.items()):
        parts = [(*header.tolist(), mean, var) for header, mean, var in (r[index] for r in ranks)]
        mean, var = pooled_moments(parts)
        updates[layer] = {
            "running_mean": cast_buffer(name, "running_mean", mean, layer),
            "running_var": cast_buffer(name, "running_var", var, layer),
            "num_batches_tracked": torch.tensor(max(int(part[1]) for part in parts)),
        }
    return updates


def pooled_moments(
    parts: list[tuple[float, float, torch.Tensor, torch.Tensor]],
) -> tuple[torch.Tensor, torch.Tensor]:
    """The pooled ``(mean, var)`` of ``parts = [(w_k, _, mean_k, var_k), ...]``: each rank's
    running statistics as a :class:`bnstats.Population` ``(w_k, mean_k, w_k * var_k)``,
    merged in list order, ``var = m2 / count`` (the mixture's, see
    :func:`sync_running_stats`); equal weights if every ``w_k`` is 0."""
    weights = [part[0] for part in parts]
    if sum(weights) == 0:
        weights = [1.0] * len(parts)
    pooled = Population()
    for weight, (_, _, mean, var) in zip(weights, parts, strict=True):
        if weight > 0:
            pooled = pooled.merge(Population.from_moments(weight, mean, weight * var))
    return pooled.mean, pooled.biased_var


__all__ = ["RankError", "sync_running_stats"]
