"""The pass of recalibrate, audit and adapt, over the union of every rank's batches.

Each rank runs the single-process pass (:func:`bnstats.torch._moments.collect_moments`) over
its own batches, giving per layer ``(count_k, mean_k, m2_k)`` in float64. After one status
exchange (:func:`bnstats.torch._ranks.run_and_exchange`), one ``all_gather`` brings every
rank's numbers to every rank, and each rank merges them in rank order with Chan, Golub &
LeVeque's (1979) formula (:meth:`LayerMoments.merge`)::

    delta = mean_k - mean
    mean  = mean + delta * count_k / (count + count_k)
    m2    = m2 + m2_k + delta**2 * count * count_k / (count + count_k)
    count = count + count_k

which is exact: the result is the ``(count, mean, m2)`` of the concatenation of all ranks'
values, as one process would get from all the batches, rank 0's first. Every rank merges the
same float64 numbers in the same order with element-wise operations only, so every rank
ends with bit-identical results. A rank may hold any number of batches, zero included; a
layer that no forward reached on one rank is fine if another rank reached it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from bnstats.torch._layers import Forward, display_name, is_lazy_uninitialized, unwrap
from bnstats.torch._local_pass import local_batch_statistics
from bnstats.torch._moments import Collection, LayerMoments, collect_moments
from bnstats.torch._ranks import (
    Group,
    all_gather_float64,
    check_same_layers,
    layout_of,
    resolve_group,
    run_and_exchange,
)

Check = Callable[[nn.Module], None]
"""``check(model)``: validation run before the pass, on every rank inside the protocol."""

_HEADER = 4  # count, batches, max_calls_per_forward, first_reached


def collect_across_ranks(
    model: nn.Module,
    batches: Any,
    *,
    group: Group = None,
    check: Check | None = None,
    forward: Forward | None = None,
    max_samples: int | None = None,
    float64_moments: bool = False,
) -> Collection:
    """Every BN layer's population moments over all ranks' ``batches`` (see the module doc).

    ``group`` as in :func:`bnstats.torch._ranks.resolve_group`. Without a group this is
    exactly the single-process pass. ``model`` may be wrapped in ``DistributedDataParallel``
    (the pass runs through ``model.module``); ``nn.SyncBatchNorm`` layers normalize each
    batch locally during the pass (:func:`local_batch_statistics`). ``max_samples`` counts
    this rank's samples. ``check(model)`` runs first, on the unwrapped model.

    In a group: raises :class:`bnstats.torch.distributed.RankError` on every rank if any
    rank failed (naming it and its error), and ``ValueError`` on every rank if no rank had a
    batch or no rank's forward reached a BN layer.
    """
    chosen = resolve_group(group)
    inner = unwrap(model)
    options = {"forward": forward, "max_samples": max_samples, "float64_moments": float64_moments}
    with local_batch_statistics(inner):
        if chosen is None:
            if check is not None:
                check(inner)
            return collect_moments(inner, batches, **options)
        return _collect_in_group(chosen, inner, batches, check, options)


def _collect_in_group(
    group: Any, model: nn.Module, batches: Any, check: Check | None, options: dict[str, Any]
) -> Collection:
    def local() -> tuple[Collection, dict[str, Any]]:
        if check is not None:
            check(model)
        collected = collect_moments(model, batches, check_coverage=False, **options)
        _require_initialized(collected)
        layers = {name: moments.layer for name, moments in collected.layers.items()}
        return collected, {"layers": layout_of(layers), "sizes": collected.batch_sizes}

    collected, summaries = run_and_exchange(group, local)
    check_same_layers(group, [summary["layers"] for summary in summaries])
    gathered = all_gather_float64(group, _pack(collected))
    sizes = [size for summary in summaries for size in summary["sizes"]]
    merged = _merge(collected, gathered)
    _check_union_coverage(merged, sizes, len(gathered))
    return Collection(merged, sizes)


def _require_initialized(collected: Collection) -> None:
    for name, moments in collected.layers.items():
        if is_lazy_uninitialized(moments.layer):
            raise ValueError(
                f"BN layer {display_name(name)} is an uninitialized "
                f"{type(moments.layer).__name__}: no batch on this rank reached it, so it has "
                "no shape to receive the merged statistics; run one forward on every rank first"
            )


def _pack(collected: Collection) -> torch.Tensor:
    """One flat float64 tensor: per layer ``[count, batches, calls, first, mean, m2]``
    (zeros for a layer this rank did not reach)."""
    parts = []
    for moments in collected.layers.values():
        channels = int(moments.layer.num_features)
        header = [moments.count, moments.batches, moments.max_calls_per_forward]
        header.append(moments.first_reached or 0)
        parts.append(torch.tensor(header, dtype=torch.float64))
        if moments.mean is None:
            parts.append(torch.zeros(2 * channels, dtype=torch.float64))
        else:
            parts += [moments.mean.double().cpu(), moments.m2.double().cpu()]
    return torch.cat(parts)


def _merge(collected: Collection, gathered: list[torch.Tensor]) -> dict[str, LayerMoments]:
    """Each layer's moments merged over the ranks in rank order (Chan et al. 1979)."""
    merged = {}
    offset = 0
    ranks_order = len(collected.layers) + 1  # first_reached: by first rank, then its order
    for name, local in collected.layers.items():
        channels = int(local.layer.num_features)
        result = LayerMoments(name, local.layer)
        for rank, flat in enumerate(gathered):
            count, batches, calls, first = (int(v) for v in flat[offset : offset + _HEADER])
            mean = flat[offset + _HEADER : offset + _HEADER + channels]
            m2 = flat[offset + _HEADER + channels : offset + _HEADER + 2 * channels]
            if batches > 0:
                result.merge(count, mean, m2, batches)
                if result.first_reached is None:
                    result.first_reached = rank * ranks_order + first
            result.max_calls_per_forward = max(result.max_calls_per_forward, calls)
        if result.mean is not None:  # merged on the CPU, used next to the layer's buffers
            device = local.layer.running_mean.device
            result.mean, result.m2 = result.mean.to(device), result.m2.to(device)
        merged[name] = result
        offset += _HEADER + 2 * channels
    return merged


def _check_union_coverage(
    merged: dict[str, LayerMoments], sizes: list[int | None], world_size: int
) -> None:
    """The single-process checks, on the union of the ranks' passes (the same on every rank)."""
    if not sizes:
        raise ValueError(
            f"batches yielded no batch on any of the {world_size} ranks; there is nothing to "
            "measure statistics on"
        )
    unreached = [name for name, moments in merged.items() if moments.batches == 0]
    if unreached:
        names = ", ".join(display_name(name) for name in unreached)
        raise ValueError(
            f"no forward on any of the {world_size} ranks reached BN layer(s) {names} in "
            f"{len(sizes)} batches, so their statistics cannot be measured; nothing was "
            "written. If a layer is used only in training mode (an auxiliary head), pass "
            "forward=... that calls it"
        )
