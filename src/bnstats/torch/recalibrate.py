"""Exact population statistics for every BN layer of a PyTorch model, in one pass.

PreciseBN (Wu & Johnson 2021): with the weights frozen, run the model over data and store
in each BN layer the mean and variance of everything that layer received, instead of the
running average training left there. Ioffe & Szegedy (2015, Alg. 2) define the test-time
statistics as ``E[z]`` and the unbiased ``Var[z]`` over the training data; this is that,
computed exactly, each sample weighted equally however uneven the batches.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from bnstats.torch._across_ranks import collect_across_ranks
from bnstats.torch._layers import Forward, display_name
from bnstats.torch._moments import Collection, LayerMoments
from bnstats.torch._ranks import Group


def recalibrate(
    model: nn.Module,
    batches: Any,
    *,
    max_samples: int | None = None,
    forward: Forward | None = None,
    float64_moments: bool = False,
    group: Group = None,
) -> nn.Module:
    """Set every BN layer's running statistics to the exact population values on ``batches``.

    For each BN layer (``nn.BatchNorm1d/2d/3d``, ``nn.SyncBatchNorm``, ``nn.LazyBatchNorm*``,
    bnstats' ``BatchNorm1d/2d/3d``; layers with ``track_running_stats=False`` keep no
    statistics and are skipped), with ``z`` every value the layer received over the pass,
    ``count`` values per channel::

        running_mean = mean(z)
        running_var  = m2 / (count - 1),      m2 = sum((z - mean(z))**2)   (unbiased)
        num_batches_tracked = batches         batch statistics merged into the layer

    ``mean`` and ``m2`` are merged batch by batch in float64 with Chan et al.'s (1979)
    formula and cast to each buffer's dtype at the end. ``num_batches_tracked`` becomes the
    number of batches that reached the layer (times its calls per forward), as after
    ``torch.optim.swa_utils.update_bn``: a layer with ``momentum=None`` carries on
    averaging as if those batches had been its history.

    During the single pass the BN layers are in training mode and normalize with each
    batch's own statistics, as in training (and as in ``update_bn`` and fvcore's precise
    BN), so each layer is measured on the activations the layers before it produce in
    training; every other module is in eval mode (dropout off), as at test time. Autograd
    is off. Batch moments come from torch's fused kernel; ``float64_moments=True`` takes
    them in float64 instead, for activations whose mean dwarfs their spread.

    Args:
        model: the model; modified in place and returned.
        batches: an iterable of batches: tensors, ``(input, target)`` tuples or lists, or
            dicts (see ``forward``). Each batch is moved to the model's device.
        max_samples: stop after this many samples (first dimension); the batch crossing the
            limit is cut, and no further batch is drawn. In a group: this rank's samples.
        forward: ``forward(model, batch)`` calls the model on one batch. Default:
            ``model(batch)`` for a tensor, ``model(batch[0])`` for a tuple or list,
            ``model(**batch)`` for a dict.
        float64_moments: take each batch's moments in float64 (slower, exact).
        group: the torch.distributed ranks whose batches together are the data. ``None``
            (default): the default process group when torch.distributed is initialized with
            more than one rank, else this process alone; ``False``: this process alone; or
            a ``ProcessGroup``. In a group each rank passes ITS batches (any number, zero
            included, as long as some rank has one) and every rank ends with the same
            buffers, bit for bit: those of one process recalibrating on all ranks' batches
            (``count``, ``mean``, ``m2`` merged across ranks in float64, rank order). A model
            wrapped in ``DistributedDataParallel`` is run through ``model.module``; each
            ``nn.SyncBatchNorm`` normalizes its local batch during the pass. See
            ``docs/distributed.md``.

    All or nothing: the model's modes, momenta and hooks are left as found, and if anything
    raises, no buffer changes. Raises ``ValueError`` naming the layer for an empty
    ``batches``, a model without BN layers, a layer that no forward reached, an input with
    one value per channel or of the wrong shape; :class:`bnstats.NonFiniteStatisticsError`
    (a ``ValueError``) for NaN or Inf statistics; ``TypeError`` for unusable arguments. In
    a group, if any rank fails every rank raises :class:`bnstats.torch.distributed.RankError`
    naming the failed rank(s) and their errors, and no rank writes anything.
    """
    collected = collect_across_ranks(
        model,
        batches,
        group=group,
        forward=forward,
        max_samples=max_samples,
        float64_moments=float64_moments,
    )
    write_buffers(population_buffers(collected))
    return model


def population_buffers(collected: Collection) -> dict[nn.Module, dict[str, torch.Tensor]]:
    """The new buffers of every layer, computed and checked before anything is written."""
    return {m.layer: _population_buffers(m) for m in collected.in_forward_order()}


def _population_buffers(moments: LayerMoments) -> dict[str, torch.Tensor]:
    population = moments.population()  # raises NonFiniteStatisticsError naming the layer
    layer = moments.layer
    return {
        "running_mean": cast_buffer(moments.name, "running_mean", population.mean, layer),
        "running_var": cast_buffer(moments.name, "running_var", population.var, layer),
        "num_batches_tracked": torch.tensor(moments.batches),
    }


def cast_buffer(name: str, key: str, value: torch.Tensor, layer: nn.Module) -> torch.Tensor:
    """``value`` in the dtype of ``layer``'s buffer ``key``; ``ValueError`` if it overflows."""
    buffer = getattr(layer, key)
    cast = value.to(dtype=buffer.dtype, device=buffer.device)
    if not bool(torch.isfinite(cast).all()):
        raise ValueError(
            f"BN layer {display_name(name)}: {key} overflows the buffer's dtype {buffer.dtype} "
            f"(largest value {float(value.abs().max()):.6g}); nothing was written"
        )
    return cast


def write_buffers(updates: dict[nn.Module, dict[str, torch.Tensor]]) -> None:
    """Copy the new values into the layers' buffers, in place."""
    with torch.no_grad():
        for layer, values in updates.items():
            for key, value in values.items():
                getattr(layer, key).copy_(value)
