"""A batch's per-channel moments as torch's kernels compute them (:func:`batch_moments`), and
the check of what a BN layer receives (:func:`check_layer_input`)."""

from __future__ import annotations

from typing import Any

import torch

from bnstats._array import widen
from bnstats.stats import pooled_batches
from bnstats.torch._layer_pass import LayerPass
from bnstats.torch._layers import (
    fewer_than_two_values,
)
from bnstats.torch.modules import NARROW_DTYPES


def batch_moments(x: torch.Tensor, float64: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel ``mean`` and BIASED ``var`` of ``x`` (N, C, ...) over all axes but 1, widened.

    ``torch.batch_norm_update_stats`` (the kernel training BN uses; float16 and bfloat16 off
    CUDA are upcast to float32 first, as the CPU kernel would return half-precision moments);
    ``float64=True``: ``torch.var_mean`` of ``x`` in float64.
    """
    if float64:
        return _float64_moments(x)
    if x.dtype in NARROW_DTYPES and x.device.type != "cuda":
        x = x.float()
    if channels_last_on_cpu(x):
        return _channels_last_moments(x)
    mean, var = torch.batch_norm_update_stats(x, None, None, 0.0)
    return widen(mean), widen(var)


_FLOAT64_VALUES = 2**18
"""Values widened to float64 at once by :func:`batch_moments` (``float64=True``): a larger
input is widened piece by piece along its first dimension, so that its float64 copy holds
2 MiB or one sample (eval mode's one batch holds all the data)."""


def _float64_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.var_mean`` in float64 of pieces of ``x`` along its first dimension, each
    holding at most :data:`_FLOAT64_VALUES` values (one sample at least), pooled
    (:func:`_pooled`)."""
    axes = (0, *range(2, x.dim()))
    per_sample = x[0].numel() if len(x) else 1
    pieces = x.split(max(1, _FLOAT64_VALUES // max(1, per_sample))) if len(x) else (x,)
    if len(pieces) == 1:
        var, mean = torch.var_mean(widen(x), dim=axes, correction=0)
        return mean, var
    moments = [torch.var_mean(widen(piece), dim=axes, correction=0) for piece in pieces]
    variances = torch.stack([var for var, _ in moments])
    means = torch.stack([mean for _, mean in moments])
    counts = torch.tensor([[float(len(piece))] for piece in pieces], dtype=means.dtype)
    return _pooled(means, variances, counts.to(means.device))


def _pooled(
    means: torch.Tensor, variances: torch.Tensor, counts: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per channel, the mean and biased variance of groups with these (G, C) ``means`` and
    biased ``variances``, group ``g`` of ``counts[g]`` values (a (G, 1) column), pooled as
    :class:`bnstats.Population` pools batches (:func:`bnstats.stats.pooled_batches`)."""
    total = counts.sum(dim=0)
    mean, m2 = pooled_batches(counts, total, means, counts * variances, finite=True)
    return mean, m2 / total


def channels_last_on_cpu(x: torch.Tensor) -> bool:
    """True for a channels-last CPU tensor (N, C, ...), whose moments torch's CPU kernel sums
    value by value in float32 (9e-6 off on 32x64x28x28 with mean 5, std 3; the contiguous
    kernel 8e-8); :func:`batch_moments` takes them by :func:`_channels_last_moments`."""
    if x.is_contiguous() or x.dim() not in (4, 5) or x.device.type != "cpu":
        return False
    return x.movedim(1, -1).is_contiguous()


_ROWS_PER_COLUMN = 32
"""Channels-last moments: at most this many values per partial sum (float32 rounding of a
sum of n values grows with n; 32 keeps it at or below the contiguous kernel's)."""


def _channels_last_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel ``mean`` and biased ``var`` of a channels-last CPU tensor, as precise as the
    contiguous kernel's (a channels-last ResNet-18-shaped model: 2.2e-7 from float64 moments
    where the kernel's are 1.3e-6 off; a conv-BN stack with means 3 standard deviations out:
    7.5e-8 against 5.4e-5), for about 25 % more time per pass on such models.

    The memory as it lies is ``R = numel / C`` rows of ``C`` values; read as ``R / G`` rows of
    ``G * C`` columns (``G`` the smallest divisor of ``R`` leaving at most 32 rows), one
    kernel call gives each column's ``m_g, v_g`` from short sums; the ``G`` columns of each
    channel, equal in size, merge in float64::

        mean = sum_g m_g / G,   var = sum_g (v_g + (m_g - mean)**2) / G
    """
    channels = x.shape[1]
    rows = x.numel() // channels
    groups = _groups(rows)
    columns = x.movedim(1, -1).reshape(rows // groups, groups * channels)
    means, variances = torch.batch_norm_update_stats(columns, None, None, 0.0)
    means, variances = widen(means).view(groups, channels), widen(variances).view(groups, channels)
    return _pooled(means, variances, torch.ones_like(means[:, :1]))


def _groups(rows: int) -> int:
    """The smallest divisor ``G`` of ``rows`` with ``rows / G <= 32`` (``rows`` itself at worst)."""
    groups = max(1, -(-rows // _ROWS_PER_COLUMN))
    while rows % groups:
        groups += 1
    return groups


def kernel_measures(x: torch.Tensor, buffers_dtype: torch.dtype) -> bool:
    """True where torch's BN kernel, writing into running buffers of ``buffers_dtype``,
    measures ``x`` as :func:`batch_moments` would: ``x`` in that dtype, not float16/bfloat16
    (the kernel writes each batch's moments into buffers of that dtype, rounding them before
    the float64 merge: a batch mean of 1000 to the nearest 0.5 in float16, the population
    variance then off by about 3e-3 where the buffer's own rounding costs 2e-4; the pass's
    own moments are float32 on CUDA), not channels-last on the CPU
    (:func:`channels_last_on_cpu`)."""
    return x.dtype == buffers_dtype and x.dtype not in NARROW_DTYPES and not channels_last_on_cpu(x)


def check_layer_input(moments: LayerPass, x: Any, least: int = 2) -> int:
    """Values per channel in ``x``; ``TypeError``/``ValueError`` naming the layer if unusable
    (fewer than ``least`` values per channel: 2 where the layer normalizes with the batch's
    statistics, 1 in an eval-mode pass)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{moments.label} was called on a {type(x).__name__}, not a tensor")
    shape, features = tuple(x.shape), moments.layer.num_features
    if len(shape) < 2 or shape[1] != features:
        raise ValueError(
            f"{moments.label}: expected input of shape (N, {features}, ...), got {shape}"
        )
    count = x.numel() // shape[1]
    if count < least:
        raise ValueError(
            fewer_than_two_values(moments.label, shape)
            + " (drop batches of one sample, choose max_samples so that the last batch "
            "keeps 2 or more, or pass mode='eval', which needs no batch statistics)"
        )
    return count
