"""One pass over the data collecting every BN layer's exact population moments.

For each BN layer, each batch's per-channel ``mean`` and biased ``var`` (over the
``count = numel / C`` values per channel) are taken from torch's own kernel,
``torch.batch_norm_update_stats`` (one fused pass, accumulating in float32 or wider), in a
forward pre-hook, and merged into the layer's ``(count, mean, m2)`` in float64 with the
parallel formula of Chan, Golub & LeVeque (1979) (:func:`bnstats.stats.chan_merge`)::

    m2_batch = var * count
    delta    = mean_batch - mean
    mean     = mean + delta * count_batch / (count + count_batch)
    m2       = m2 + m2_batch + delta**2 * count * count_batch / (count + count_batch)

so every value (sample, or sample-and-position for conv layers) weighs the same whatever
the batch sizes. With ``float64_moments=True`` each batch's moments are taken in float64
instead (a second, two-pass reduction per layer), for data whose mean dwarfs its spread.

The result, :class:`Collection`, is what a tool writes from; merging collections across
processes needs only :meth:`LayerMoments.merge` per layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from bnstats._array import widen
from bnstats.stats import NonFiniteStatisticsError, Population, chan_merge
from bnstats.torch._batchnorm_layers import (
    Forward,
    PreservedState,
    batchnorm_train_mode,
    default_forward,
    display_name,
    find_batchnorm_layers,
    iterate_batches,
    model_device,
    move_to_device,
)

_NARROW = (torch.float16, torch.bfloat16)


@dataclass
class LayerMoments:
    """Per-channel ``(count, mean, m2)`` of every value one BN layer received, in float64.

    ``m2 = sum((z - mean)**2)``; ``batches`` counts the batch statistics merged (one per
    call of the layer); ``max_calls_per_forward`` is 2 or more for a layer that one forward
    used several times.
    """

    name: str
    layer: _BatchNorm
    count: float = 0
    mean: torch.Tensor | None = None
    m2: torch.Tensor | None = None
    batches: int = 0
    max_calls_per_forward: int = 0
    first_reached: int | None = None
    calls_this_forward: int = field(default=0, repr=False)

    def merge(self, count: float, mean: torch.Tensor, m2: torch.Tensor, batches: int = 1) -> None:
        """Merge in another set of values given by its ``(count, mean, m2)`` (Chan et al.)."""
        mean, m2 = widen(mean), widen(m2)
        if self.mean is None:
            self.mean, self.m2 = mean.clone(), m2.clone()
        else:
            self.mean, self.m2 = chan_merge(self.count, self.mean, self.m2, count, mean, m2)
        self.count += count
        self.batches += batches

    def population(self) -> Population:
        """The moments as a :class:`bnstats.Population` (``.mean``, unbiased ``.var``).

        Raises :class:`bnstats.NonFiniteStatisticsError` naming the layer if a batch brought
        NaN or Inf.
        """
        try:
            return Population.from_moments(self.count, self.mean, self.m2)
        except NonFiniteStatisticsError as error:
            raise NonFiniteStatisticsError(
                f"BN layer {display_name(self.name)}: the population statistics are NaN or "
                f"Inf after {self.batches} batches ({error}); nothing was written"
            ) from None

    @property
    def var(self) -> torch.Tensor:
        """Unbiased population variance ``m2 / (count - 1)``."""
        return self.m2 / (self.count - 1)


@dataclass
class Collection:
    """The moments of every BN layer by qualified name, and the sizes of the batches used."""

    layers: dict[str, LayerMoments]
    batch_sizes: list[int | None]

    def in_forward_order(self) -> list[LayerMoments]:
        """The layers in the order the first forward reached them."""
        return sorted(self.layers.values(), key=lambda m: m.first_reached or 0)


def batch_moments(x: torch.Tensor, float64: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel ``mean`` and BIASED ``var`` of ``x`` (N, C, ...) over all axes but 1.

    Fast path: ``torch.batch_norm_update_stats`` (the kernel training BN uses; float16 and
    bfloat16 inputs off CUDA are upcast to float32 first, as the CPU kernel would otherwise
    return half-precision moments). ``float64=True``: ``torch.var_mean`` of ``x`` in float64.
    Both are returned widened (float64).
    """
    if float64:
        axes = (0, *range(2, x.dim()))
        var, mean = torch.var_mean(widen(x), dim=axes, correction=0)
        return mean, var
    if x.dtype in _NARROW and x.device.type != "cuda":
        x = x.float()
    mean, var = torch.batch_norm_update_stats(x, None, None, 0.0)
    return widen(mean), widen(var)


def check_layer_input(name: str, layer: _BatchNorm, x: Any) -> int:
    """Values per channel in ``x``; ``TypeError``/``ValueError`` naming the layer if unusable."""
    label = f"BN layer {display_name(name)} ({type(layer).__name__}({layer.num_features}))"
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{label} was called on a {type(x).__name__}, not a tensor")
    shape = tuple(x.shape)
    if x.dim() < 2 or shape[1] != layer.num_features:
        raise ValueError(
            f"{label}: expected input of shape (N, {layer.num_features}, ...), got {shape}"
        )
    count = x.numel() // shape[1]
    if count < 2:
        raise ValueError(
            f"{label}: input of shape {shape} has {count} value per channel; batch statistics "
            "need at least 2 (drop batches of one sample, or choose max_samples so that the "
            "last batch keeps 2 or more)"
        )
    return count


def _statistics_hook(
    moments: LayerMoments, state: PreservedState, order: list[int], float64: bool
) -> Any:
    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        state.record_buffers(moments.name)  # a LazyBatchNorm is initialized by now
        x = args[0] if args else kwargs.get("input")
        count = check_layer_input(moments.name, moments.layer, x)
        mean, var = batch_moments(x.detach(), float64)
        moments.merge(count, mean, var * count)
        moments.calls_this_forward += 1
        if moments.first_reached is None:
            order[0] += 1
            moments.first_reached = order[0]

    return hook


def collect_moments(
    model: nn.Module,
    batches: Any,
    *,
    forward: Forward | None = None,
    max_samples: int | None = None,
    float64_moments: bool = False,
    check_coverage: bool = True,
) -> Collection:
    """One pass of ``model`` over ``batches``, returning every BN layer's population moments.

    During the pass the BN layers are in training mode (normalizing with batch statistics)
    and every other module in eval mode (see
    :func:`bnstats.torch._batchnorm_layers.batchnorm_train_mode`); autograd is off; each
    batch goes to the model's device. The model is left exactly as found, also on error:
    modes, momenta, running buffers, hooks (see :class:`PreservedState`).

    Raises ``ValueError`` if ``batches`` is empty or a BN layer was never reached, unless
    ``check_coverage=False`` (across ranks, the union of the ranks' passes is checked).
    """
    layers = find_batchnorm_layers(model)
    forward = default_forward if forward is None else forward
    if not callable(forward):
        raise TypeError(f"forward must be callable as forward(model, batch), got {forward!r}")
    device = model_device(model)
    moments = {name: LayerMoments(name, layer) for name, layer in layers.items()}
    sizes: list[int | None] = []
    order = [0]
    with PreservedState(model, layers) as state, torch.no_grad():
        batchnorm_train_mode(model, layers)
        for name, layer in layers.items():
            hook = _statistics_hook(moments[name], state, order, float64_moments)
            state.add_hook(layer.register_forward_pre_hook(hook, with_kwargs=True))
        for batch, size in iterate_batches(batches, max_samples):
            for layer_moments in moments.values():
                layer_moments.calls_this_forward = 0
            forward(model, move_to_device(batch, device))
            sizes.append(size)
            for layer_moments in moments.values():
                layer_moments.max_calls_per_forward = max(
                    layer_moments.max_calls_per_forward, layer_moments.calls_this_forward
                )
    if check_coverage:
        _check_coverage(moments, sizes)
    return Collection(moments, sizes)


def _check_coverage(moments: dict[str, LayerMoments], sizes: list[int | None]) -> None:
    if not sizes:
        raise ValueError("batches yielded no batch; there is nothing to measure statistics on")
    unreached = [name for name, m in moments.items() if m.batches == 0]
    if unreached:
        names = ", ".join(display_name(name) for name in unreached)
        raise ValueError(
            f"no forward reached BN layer(s) {names} in {len(sizes)} batches, so their "
            "statistics cannot be measured; nothing was written. If a layer is used only in "
            "training mode (an auxiliary head), pass forward=... that calls it"
        )
