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
import warnings
from typing import Any, Literal

import torch
from torch import nn

from bnstats._array import widen
from bnstats.torch._layer_pass import LayerPass, Measured
from bnstats.torch._layers import cast_buffer, display_name, layer_label, write_buffers
from bnstats.torch._measure import measure
from bnstats.torch._ranks import Group
from bnstats.torch.options import Forward, PassOptions


def adapt(
    model: nn.Module,
    batches: Any,
    prior: float = 16,
    *,
    batch_size: int | None = None,
    never_updated: str = "warn",
    forward: Forward | None = None,
    max_samples: int | None = None,
    float64_moments: bool = False,
    group: Group = None,
    nonfinite: Literal["raise", "skip"] = "raise",
    unreached: Literal["raise", "keep"] = "raise",
    mode: Literal["train", "eval", "eval_exact"] = "train",
    tolerance: float | None = None,
    progress: bool | None = None,
    one_batch_bytes: int | None = None,
) -> nn.Module:
    """Mix every BN layer's running statistics toward the statistics of ``batches``.

    With ``N = prior``, ``n`` the target batch size, ``mu_source``/``var_source`` the
    layer's current ``running_mean``/``running_var`` and ``mu_target``/``var_target`` the
    exact population mean and unbiased variance of the layer's input over ``batches``
    (measured as :func:`~bnstats.torch.recalibrate` does, in one pass)::

        running_mean = N / (N + n) * mu_source  + n / (N + n) * mu_target
        running_var  = N / (N + n) * var_source + n / (N + n) * var_target

    computed in float64 and cast to each buffer's dtype; ``num_batches_tracked`` is left as
    it was (it counts the source's history). ``n`` is the number of target samples each
    prediction is adapted with (Schneider et al. 2020): by default the largest batch's size;
    ``batch_size=`` sets it.

    Args:
        model: the model (or a wrapper); modified in place and returned.
        batches: target-domain batches (tensors, ``(input, target)`` tuples, dicts).
        prior: ``N`` >= 0, the source statistics' worth in samples; 0 adapts fully (the
            same statistics as ``recalibrate`` on ``batches``).
        batch_size: ``n``; default: the largest batch's size (in a group, on any rank).
        never_updated: what to do with a layer whose source statistics were never updated
            (``running_mean`` still exactly 0 and ``running_var`` 1, whatever
            ``num_batches_tracked`` says: a checkpoint without that key has real statistics
            and a count of 0): mixing the target with 0 and 1 would be meaningless.
            ``"warn"`` (default): adapt fully there (as ``prior=0``) and warn; ``"raise"``:
            ``ValueError`` naming the layers.
        forward, max_samples, float64_moments, group, nonfinite, unreached, mode,
            tolerance, progress: the options of every pass (:class:`bnstats.torch.PassOptions`).

    All or nothing, and the model's modes, momenta and hooks are left as found. Raises
    ``ValueError`` for a negative or non-finite ``prior``, a non-positive ``batch_size``,
    non-finite results (naming the layer), and the errors of ``recalibrate``.
    """
    measured = measure(
        model,
        batches,
        PassOptions.pick(locals()),
        tool="adapt",
        check=lambda _: _check_arguments(prior, batch_size, never_updated),  # on every rank
        arguments={"prior": prior, "batch_size": batch_size, "never_updated": never_updated},
        precise=False,  # adapt reports no standard errors
    )
    prior = float(prior)
    n = _target_batch_size(measured) if batch_size is None else int(batch_size)
    fresh = [m.name for m in measured.reached() if _never_updated(m.layer)]
    if fresh:
        names = ", ".join(display_name(name) for name in fresh)
        if never_updated == "raise":
            raise ValueError(
                f"BN layer(s) {names} were never updated (running statistics still 0 and 1): "
                "there is no source to mix with; recalibrate them, or pass never_updated='warn' "
                "to adapt them fully; nothing was written"
            )
        warnings.warn(
            f"bnstats.adapt: BN layer(s) {names} were never updated (running statistics still "
            "0 and 1); their statistics are the target's alone (prior 0 there)",
            stacklevel=2,
        )
    updates = {}
    for moments in measured.reached():
        source_weight = 0.0 if moments.name in fresh else prior / (prior + n)
        updates[moments.layer] = _mixed_buffers(measured, moments, source_weight)
    write_buffers(updates)
    return model


def _never_updated(layer: nn.Module) -> bool:
    """The running statistics are still torch's start, ``running_mean`` all 0 and
    ``running_var`` all 1. ``num_batches_tracked`` does not decide: a checkpoint saved
    without it loads real statistics with a count of 0."""
    return bool((layer.running_mean == 0).all() & (layer.running_var == 1).all())


def _check_arguments(prior: Any, batch_size: Any, never_updated: Any) -> None:
    if never_updated not in ("warn", "raise"):
        raise ValueError(f"never_updated must be 'warn' or 'raise', got {never_updated!r}")
    if isinstance(prior, bool) or not isinstance(prior, (int, float)):
        raise TypeError(f"prior must be a number (pseudo-samples), got {type(prior).__name__}")
    if not math.isfinite(prior) or prior < 0:
        raise ValueError(f"prior must be a finite number >= 0, got {prior!r}")
    if batch_size is not None and (isinstance(batch_size, bool) or int(batch_size) < 1):
        raise ValueError(f"batch_size must be a positive integer or None, got {batch_size!r}")


def _target_batch_size(measured: Measured) -> int:
    sizes = [size for size in measured.batch_sizes if size is not None]
    if not sizes:
        raise TypeError(
            "cannot tell the target batch size n from batches without tensors; pass batch_size="
        )
    return max(sizes)


def _mixed_buffers(
    measured: Measured, moments: LayerPass, source_weight: float
) -> dict[str, torch.Tensor]:
    """``N / (N + n) * source + n / (N + n) * target`` per buffer, checked and cast."""
    layer = moments.layer
    target = measured.population(moments)  # raises NonFiniteStatisticsError naming the layer
    mixed = {}
    for key, target_value in (("running_mean", target.mean), ("running_var", target.var)):
        if source_weight == 0.0:  # full adaptation; also ignores a non-finite source
            value = target_value
        else:
            source = widen(getattr(layer, key).detach()).to(target_value.device)
            value = source_weight * source + (1.0 - source_weight) * target_value
        if not bool(torch.isfinite(value).all()):
            raise ValueError(
                f"{layer_label(moments.name)}: the adapted {key} is NaN or Inf (the source "
                f"{key} holds non-finite values); nothing was written"
            )
        mixed[key] = cast_buffer(moments.name, key, value, layer)
    return mixed
