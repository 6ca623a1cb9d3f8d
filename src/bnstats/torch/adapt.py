"""Test-time adaptation of BN statistics to shifted data (Schneider et al. 2020).

Under covariate shift (corruptions, a new camera, a new site) the source statistics stored
in the BN layers no longer describe the inputs. Schneider et al. (2020) replace them by a
mixture of the source statistics, worth ``N`` pseudo-samples (the prior), and the
statistics of the target data, worth ``n`` samples (the test batch size)::

    mu  = N / (N + n) * mu_source  + n / (N + n) * mu_target
    var = N / (N + n) * var_source + n / (N + n) * var_target

``N = 0`` is full adaptation (the target statistics alone); a large ``N`` keeps the source.
On ResNet-50 and ImageNet-C full adaptation lowers the mCE from 76.7 to 62.2.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from bnstats._array import widen
from bnstats.torch._across_ranks import collect_across_ranks
from bnstats.torch._layers import Forward, display_name
from bnstats.torch._moments import Collection, LayerMoments
from bnstats.torch._ranks import Group
from bnstats.torch.recalibrate import cast_buffer, write_buffers


def adapt(
    model: nn.Module,
    batches: Any,
    prior: float = 16,
    *,
    batch_size: int | None = None,
    forward: Forward | None = None,
    max_samples: int | None = None,
    float64_moments: bool = False,
    group: Group = None,
) -> nn.Module:
    """Mix every BN layer's running statistics toward the statistics of ``batches``.

    With ``N = prior``, ``n`` the target batch size, ``mu_source``/``var_source`` the
    layer's current ``running_mean``/``running_var`` and ``mu_target``/``var_target`` the
    exact population mean and unbiased variance of the layer's input over ``batches``
    (measured as :func:`~bnstats.torch.recalibrate` does, in one pass)::

        running_mean = N / (N + n) * mu_source  + n / (N + n) * mu_target
        running_var  = N / (N + n) * var_source + n / (N + n) * var_target

    computed in float64 and cast to each buffer's dtype. ``num_batches_tracked`` is left as
    it was (it counts the source's history).

    ``n`` is the number of target samples each prediction's statistics are adapted with,
    the ``n`` of Schneider et al. (2020): by default the size (first dimension) of the
    largest batch in ``batches`` (the loader's batch size, a short last batch
    notwithstanding); give ``batch_size`` to set it explicitly. To weigh the target by all
    the samples measured instead (a conjugate-prior reading), pass
    ``batch_size=<number of samples>``.

    Args:
        model: the model; modified in place and returned.
        batches: target-domain batches (tensors, ``(input, target)`` tuples, dicts).
        prior: ``N`` >= 0, the source statistics' worth in samples; 0 adapts fully (the
            same statistics as ``recalibrate`` on ``batches``).
        batch_size: ``n``; default: the largest batch's size.
        forward, max_samples, float64_moments, group: as for
            :func:`~bnstats.torch.recalibrate`. In a group the target statistics, and the
            default ``n`` (the largest batch on any rank), are those of all ranks' batches
            together; each rank mixes them with its own source statistics.

    All or nothing, and the model's modes, momenta and hooks are left as found. Raises
    ``ValueError`` for a negative or non-finite ``prior``, a non-positive ``batch_size``,
    non-finite results (naming the layer), and the errors of ``recalibrate``.
    """
    collected = collect_across_ranks(
        model,
        batches,
        group=group,
        check=lambda _: _check_arguments(prior, batch_size),  # in a group: on every rank
        forward=forward,
        max_samples=max_samples,
        float64_moments=float64_moments,
    )
    prior = float(prior)
    n = _target_batch_size(collected) if batch_size is None else int(batch_size)
    weights = (prior / (prior + n), n / (prior + n))
    updates = {m.layer: _mixed_buffers(m, *weights) for m in collected.in_forward_order()}
    write_buffers(updates)
    return model


def _check_arguments(prior: Any, batch_size: Any) -> None:
    _check_prior(prior)
    if batch_size is not None and (isinstance(batch_size, bool) or int(batch_size) < 1):
        raise ValueError(f"batch_size must be a positive integer or None, got {batch_size!r}")


def _check_prior(prior: Any) -> float:
    if isinstance(prior, bool) or not isinstance(prior, (int, float)):
        raise TypeError(f"prior must be a number (pseudo-samples), got {type(prior).__name__}")
    if not math.isfinite(prior) or prior < 0:
        raise ValueError(f"prior must be a finite number >= 0, got {prior!r}")
    return float(prior)


def _target_batch_size(collected: Collection) -> int:
    sizes = [size for size in collected.batch_sizes if size is not None]
    if not sizes:
        raise TypeError(
            "cannot tell the target batch size n from batches without tensors; pass batch_size="
        )
    return max(sizes)


def _mixed_buffers(
    moments: LayerMoments, weight_source: float, weight_target: float
) -> dict[str, torch.Tensor]:
    """``N / (N + n) * source + n / (N + n) * target`` per buffer, checked and cast."""
    layer = moments.layer
    target = moments.population()  # raises NonFiniteStatisticsError naming the layer
    mixed = {}
    for key, target_value in (("running_mean", target.mean), ("running_var", target.var)):
        source = widen(getattr(layer, key).detach())
        if weight_source == 0.0:  # full adaptation; also ignores a non-finite source
            value = target_value
        else:
            value = weight_source * source + weight_target * target_value
        if not bool(torch.isfinite(value).all()):
            raise ValueError(
                f"BN layer {display_name(moments.name)}: the adapted {key} is NaN or Inf (the "
                f"source {key} holds non-finite values); nothing was written"
            )
        mixed[key] = cast_buffer(moments.name, key, value, layer)
    return mixed
