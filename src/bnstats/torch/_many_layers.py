"""The end of a pass for many BN layers in one set of operations.

Layer by layer, merging a layer's gathered batches
(:meth:`bnstats.torch._layer_pass.LayerPass.flush`) or judging its precision costs some
thirty tensor operations, whatever the layer's size: on a
model of many small layers that is most of what a pass adds to the forward passes. Here the
channels of the layers sit side by side (:class:`Channels`, ``K = sum of C_l``), each batch's
count spread over its layer's channels, and each formula of :mod:`bnstats.stats` runs once for
all of them: a few operations per layer remain (its slices of the results).

The numbers are those of the layer-by-layer path, bit for bit where the formula's operations
are the same (tested in ``tests/torch/test_many_layers.py``).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from bnstats._array import largest, widen
from bnstats.precision import BatchSpread, miss_probability
from bnstats.stats import Population, pooled_batches
from bnstats.torch._layers import on_device


class GatheredLayer(Protocol):
    """What this module reads and writes of :class:`bnstats.torch._layer_pass.LayerPass` (not
    imported: that module imports this one)."""

    layer: nn.Module
    population: Population
    spread: BatchSpread
    _block: tuple[torch.Tensor, torch.Tensor] | None
    _slot_counts: list[int]
    _slot_indices: list[int]
    precise: bool

    def merge_verdict(self, verdict: torch.Tensor) -> None: ...

    def clear_gathered(self) -> None: ...


@dataclass(frozen=True)
class Channels:
    """The channels of ``len(sizes)`` layers side by side: layer ``l`` has ``sizes[l]``
    channels; ``layer_index`` (K,) names each channel's layer."""

    sizes: list[int]
    layer_index: torch.Tensor

    @classmethod
    def of(cls, sizes: Sequence[int], device: torch.device) -> Channels:
        """The layout of layers of ``sizes`` channels on ``device`` (kept for the next pass
        over the same layers: a pass builds the same one three times)."""
        return _channels(tuple(sizes), device)

    def per_channel(self, per_layer: torch.Tensor) -> torch.Tensor:
        """``(..., L)`` values of each layer, repeated over its channels: ``(..., K)``."""
        return per_layer.index_select(-1, self.layer_index)

    def per_layer_sum(self, per_channel: torch.Tensor) -> torch.Tensor:
        """``(B, K)`` summed over each layer's channels: ``(B, L)``."""
        out = per_channel.new_zeros((per_channel.shape[0], len(self.sizes)))
        return out.index_add_(1, self.layer_index, per_channel)

    def per_layer_max(self, per_channel: torch.Tensor) -> torch.Tensor:
        """``(K,)`` reduced to each layer's largest: ``(L,)``."""
        out = per_channel.new_full((len(self.sizes),), -math.inf)
        return out.scatter_reduce_(0, self.layer_index, per_channel, "amax")

    def split(self, values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``(..., K)`` into each layer's ``(..., C_l)`` (views)."""
        return values.split(self.sizes, dim=-1)

    @functools.cached_property
    def spread_order(self) -> torch.Tensor:
        """The permutation of a BatchSpread's ``3K`` values of all layers (``[means, u,
        means + u]``, each ``K`` long) that puts each layer's ``3 C_l`` together, in its own
        BatchSpread's order: the ``(3, K)`` array read column block by column block."""
        device, channels = self.layer_index.device, int(self.layer_index.shape[0])
        sizes = torch.tensor(self.sizes, device=device)
        starts = torch.cumsum(sizes, 0) - sizes
        start, size = starts[self.layer_index], sizes[self.layer_index]  # of each channel's layer
        within = torch.arange(channels, device=device) - start
        part = torch.arange(3, device=device)[:, None]
        destination = (3 * start + part * size + within).reshape(-1)  # of value part * K + k
        order = torch.empty_like(destination)
        return order.scatter_(0, destination, torch.arange(3 * channels, device=device))

    @functools.cached_property
    def spread_gather(self) -> torch.Tensor:
        """The inverse of :meth:`spread_order`: each layer's ``3 C_l`` values end to end back
        to ``[means, u, means + u]`` of all layers."""
        order = self.spread_order
        return torch.empty_like(order).scatter_(
            0, order, torch.arange(len(order), device=order.device)
        )

    def split_spread(self, values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``3K`` values in :meth:`spread_order` into each layer's ``3 C_l`` (views)."""
        return values.split([3 * size for size in self.sizes])


@functools.lru_cache(maxsize=256)  # a wide model's parts each have a layout
def _channels(sizes: tuple[int, ...], device: torch.device) -> Channels:
    index = torch.repeat_interleave(
        torch.arange(len(sizes), device=device),
        torch.tensor(sizes, device=device),
        output_size=sum(sizes),
    )
    return Channels(list(sizes), index)


def merge_rows(group: list[GatheredLayer]) -> None:
    """:meth:`bnstats.torch._layer_pass.LayerPass.flush` for layers whose gathered batches are
    all rows the kernel wrote into their blocks, the same batches for each (one call per
    forward, the common case), on one device and of one dtype: the same merge, once for all
    of them.

    With ``n_kl`` the count of batch ``k`` at layer ``l`` and ``w_kl = n_kl`` where every
    channel of the batch at that layer is finite, else 0, each channel of layer ``l`` pools
    its batches with weights ``w_kl`` (:func:`bnstats.stats.pooled_batches`) into its
    Population and its BatchSpread; a layer's verdict is its first batch with NaN or Inf
    and how many it left out."""
    first = group[0]
    rows = len(first._slot_indices)
    device = first._block[0].device
    channels = Channels.of([m._block[0].shape[1] for m in group], device)
    means = torch.cat([m._block[0][:rows] for m in group], dim=1)
    variances = torch.cat([m._block[1][:rows] for m in group], dim=1)
    counts_per_layer = on_device([m._slot_counts for m in group], torch.float64, device).T
    counts = channels.per_channel(counts_per_layer)  # (B, K)
    m2_k = variances * (counts - 1).to(variances.dtype)  # as LayerPass.flush rounds it
    narrow = torch.stack((means, m2_k))  # (2, B, K), finite exactly where its widening is
    bad = channels.per_layer_sum((~torch.isfinite(narrow).all(dim=0)).to(narrow.dtype))
    stacked = widen(narrow)
    finite = bad == 0  # (B, L)
    kept = channels.per_channel(finite)
    weights = counts * kept
    mean_k, m2_k = torch.where(kept, stacked, 0.0).unbind(0)  # a batch left out: all 0
    total = weights.sum(dim=0)
    mean, m2 = pooled_batches(weights, total, mean_k, m2_k, finite=True)
    spread = None
    if first.precise:
        for moments, block_mean in zip(group, channels.split(mean), strict=True):
            moments.spread.center_on(block_mean)  # before a layer's first batches
        spread = _pooled_spread(group, weights, total, mean_k, m2_k)
    indices = on_device(first._slot_indices, torch.float64, device)
    verdicts = torch.stack(
        (
            torch.where(finite, math.inf, indices[:, None]).amin(dim=0),
            (~finite).sum(dim=0, dtype=stacked.dtype),
        ),
        dim=1,
    )  # (L, 2)
    totals = (counts_per_layer * finite).sum(dim=0)  # (L,)
    _hand_out(group, channels, rows, totals, (mean, m2), spread, verdicts)


def _pooled_spread(
    group: list[GatheredLayer],
    weights: torch.Tensor,
    total: torch.Tensor,
    mean_k: torch.Tensor,
    m2_k: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The batches' ``[mean_k, u_k, mean_k + u_k]`` (:meth:`BatchSpread.batch_values`, all
    layers' centers side by side) pooled over the batches: ``(mean, m2)``, each ``3K`` long."""
    center = torch.cat([m.spread.center.to(mean_k) for m in group])
    values = BatchSpread(center).batch_values(weights, mean_k, m2_k).view(len(weights), 3, -1)
    spread_mean, spread_m2 = (
        pooled.reshape(-1)
        for pooled in pooled_batches(weights[:, None], total, values, None, finite=True)
    )
    return spread_mean, spread_m2


def _hand_out(
    group: list[GatheredLayer],
    channels: Channels,
    rows: int,
    totals: torch.Tensor,
    population: tuple[torch.Tensor, torch.Tensor],
    spread: tuple[torch.Tensor, torch.Tensor] | None,
    verdicts: torch.Tensor,
) -> None:
    """Each layer's slice of the pooled results into its Population, BatchSpread (unless
    ``spread`` is None) and verdict."""
    means, m2s = channels.split(population[0]), channels.split(population[1])
    if spread is not None:
        by_layer = channels.spread_order
        spread_means = channels.split_spread(spread[0].index_select(0, by_layer))
        spread_m2s = channels.split_spread(spread[1].index_select(0, by_layer))
    parts = zip(group, totals.unbind(), verdicts.unbind(), strict=True)
    for index, (moments, total, verdict) in enumerate(parts):
        moments.population.absorb_pooled(total, means[index], m2s[index], rows)
        if spread is not None:
            moments.spread.values.absorb_pooled(total, spread_means[index], spread_m2s[index], rows)
        moments.merge_verdict(verdict)
        moments.clear_gathered()


def relative_errors(layers: Sequence[GatheredLayer], finite_batches: Sequence[int]) -> torch.Tensor:
    """Each layer's worst channel's relative standard error (:meth:`LayerPass.relative_error`)
    as one ``(L,)`` tensor on the first layer's device (:func:`layer_precision`)."""
    return layer_precision(layers, finite_batches)[0]


def layer_precision(
    layers: Sequence[GatheredLayer],
    finite_batches: Sequence[int],
    tolerance: float | None = None,
    data_batches: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Each layer's worst channel's relative standard error, ``(L,)``, and with a
    ``tolerance`` the probability, at most, that some channel's mean or variance of any of
    them lies outside it (:func:`bnstats.precision.miss_probability`, 0-d): both from one
    :func:`channel_relative_errors`, on the first layer's device, no host read. Outside it
    of the population the batches are drawn from, or with ``data_batches`` (the data's
    length) of the whole data's statistics: layer ``l`` drew ``finite_batches[l]`` of them."""
    per_channel, channels = channel_relative_errors(layers, finite_batches)
    worst = channels.per_layer_max(largest(per_channel, axis=0))
    if tolerance is None:
        return worst, None
    drawn = None
    if data_batches is not None:
        shares = [batches / data_batches for batches in finite_batches]
        drawn = channels.per_channel(on_device(shares, per_channel.dtype, per_channel.device))
    return worst, miss_probability(per_channel, tolerance, drawn)


def channel_relative_errors(
    layers: Sequence[GatheredLayer], finite_batches: Sequence[int]
) -> tuple[torch.Tensor, Channels]:
    """Every channel's relative standard errors of its mean and variance, all layers side
    by side: ``(2, K)`` on the first layer's device, and the layout of the channels. One
    computation over all channels (:meth:`bnstats.precision.BatchSpread.relative_standard_errors`
    with per-channel counts and batches)."""
    populations = [m.population for m in layers]
    device = populations[0].mean.device
    channels = Channels.of([int(p.mean.shape[0]) for p in populations], device)
    together = Population()
    counts = torch.stack([torch.as_tensor(p.count).to(populations[0].mean) for p in populations])
    together.absorb_pooled(
        channels.per_channel(counts),
        torch.cat([p.mean.to(device) for p in populations]),
        torch.cat([p.m2.to(device) for p in populations]),
        0,
    )
    spread = BatchSpread(torch.cat([_center(m).to(together.mean) for m in layers]))
    spread.values.absorb_pooled(
        0.0,
        torch.zeros(3 * len(together.mean), dtype=together.mean.dtype, device=device),
        torch.cat([_spread_m2(m).to(device) for m in layers]).index_select(
            0, channels.spread_gather
        ),
        0,
    )
    measured = [
        b if m.spread.values.m2 is not None else 0
        for m, b in zip(layers, finite_batches, strict=True)
    ]
    batches = channels.per_channel(on_device(measured, torch.float64, device))
    errors = spread.relative_standard_errors(together, batches.to(together.mean))
    return errors, channels


def _spread_m2(moments: GatheredLayer) -> torch.Tensor:
    """The layer's spread ``m2`` (``3C``); zeros where the spread was not measured (such a
    layer counts 0 batches, so its standard errors are infinite)."""
    m2 = moments.spread.values.m2
    mean = moments.population.mean
    return mean.new_zeros(3 * mean.shape[0]) if m2 is None else m2


def _center(moments: GatheredLayer) -> torch.Tensor:
    center = moments.spread.center
    return torch.zeros_like(moments.population.mean) if center is None else center


def population_statistics(
    layers: Sequence[GatheredLayer],
) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], list[torch.Tensor]]:
    """Each layer's new ``running_mean = mean`` and ``running_var = m2 / (count - 1)`` in
    its buffers' dtype and device, computed for the layers of each dtype and device at once;
    and the tensors they are views of (to check for NaN and Inf at once). No host read."""
    groups: dict[tuple[object, ...], list[int]] = {}
    for index, moments in enumerate(layers):
        buffer, mean = moments.layer.running_var, moments.population.mean
        groups.setdefault((buffer.dtype, buffer.device, mean.dtype), []).append(index)
    results: list[tuple[torch.Tensor, torch.Tensor]] = [None] * len(layers)  # type: ignore[list-item]
    together = []
    for (dtype, device, _), indices in groups.items():
        populations = [layers[index].population for index in indices]
        channels = Channels.of([int(p.mean.shape[0]) for p in populations], device)
        mean = torch.cat([p.mean.to(device) for p in populations])
        m2 = torch.cat([p.m2.to(device) for p in populations])
        counts = torch.stack([torch.as_tensor(p.count).to(mean) for p in populations])
        values = torch.stack((mean, m2 / (channels.per_channel(counts) - 1))).to(dtype)
        together.append(values.reshape(-1))
        for index, part in zip(indices, channels.split(values), strict=True):
            results[index] = part.unbind(0)
    return results, together
