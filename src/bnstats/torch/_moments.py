"""One pass over the data collecting every BN layer's exact population moments.

For each BN layer, each batch's per-channel ``mean`` and variance (over the
``count = numel / C`` values per channel) come from torch's own fused kernel, accumulating
in float32 or wider, in one of two ways:

- torch's ``nn.BatchNorm1d/2d/3d`` (``_BatchNorm.forward``) with float32 or float64 input
  of the buffers' dtype: during the pass the layer's ``momentum`` is 1, so the kernel that
  normalizes the batch also writes the batch's ``mean`` and unbiased variance
  ``var_unbiased = m2_batch / (count - 1)`` into ``running_mean``/``running_var``
  (``1 * batch + 0 * old``, exactly); the forward pre-hook reads them at the layer's next
  call (or at the end of the pass). No extra pass over the activations: the pass costs
  what ``update_bn``'s does.
- any other layer (``SyncBatchNorm``, bnstats' own modules, float16/bfloat16 input) and
  ``float64_moments=True``: a forward pre-hook takes the batch's mean and biased variance
  with ``torch.batch_norm_update_stats`` (``torch.var_mean`` in float64 with
  ``float64_moments``: a second, two-pass reduction per layer, for data whose mean dwarfs
  its spread), so ``m2_batch = var * count``.

The buffers and momenta are put back afterwards (:class:`PreservedState`). Per layer the
batches' ``(count_k, mean_k, m2_k)`` are gathered in float64 and merged, up to 64 batches
at a time, into the layer's ``(count, mean, m2)``: the pooled moments of the group::

    count_g = sum(count_k);   mean_g = sum(count_k * mean_k) / count_g
    m2_g    = sum(m2_k) + sum(count_k * (mean_k - mean_g)**2)

then merged in with the parallel formula of Chan, Golub & LeVeque (1979)
(:func:`bnstats.stats.chan_merge`)::

    delta = mean_g - mean
    mean  = mean + delta * count_g / (count + count_g)
    m2    = m2 + m2_g + delta**2 * count * count_g / (count + count_g)

so every value (sample, or sample-and-position for conv layers) weighs the same whatever
the batch sizes, and no ``E[z**2] - E[z]**2`` cancellation occurs.

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
from bnstats.torch._layers import (
    Forward,
    PreservedState,
    batchnorm_train_mode,
    default_forward,
    display_name,
    find_batchnorm_layers,
    is_lazy_uninitialized,
    iterate_batches,
    model_device,
    move_to_device,
)
from bnstats.torch.modules import _EstimatorBatchNorm

_NARROW = (torch.float16, torch.bfloat16)
_KERNEL_BUFFER_DTYPES = (torch.float32, torch.float64)
_GROUP = 64
"""Batches gathered per layer before they are merged into its running moments."""


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
    _pending: list[tuple[int, torch.Tensor, int]] = field(default_factory=list, repr=False)
    _awaiting: int | None = field(default=None, repr=False)

    def add_batch(self, count: int, mean_var: torch.Tensor, unbiased: bool = False) -> None:
        """Gather one batch: ``count`` values per channel, ``mean_var`` = its per-channel
        ``mean`` and variance stacked (2, C), any float dtype; the variance is biased, or
        unbiased with ``unbiased=True``. Merged in by :meth:`flush`."""
        factor = count - 1 if unbiased else count  # m2 = var * factor
        self._pending.append((count, mean_var, factor))
        if len(self._pending) >= _GROUP:
            self.flush()

    def flush(self) -> None:
        """Merge the gathered batches into ``(count, mean, m2)`` as one group (see module)."""
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        parts = [mean_var for _, mean_var, _ in pending]
        if len({part.dtype for part in parts}) > 1:
            parts = [widen(part) for part in parts]
        stacked = widen(torch.stack(parts))  # (batches, 2, C)
        means = stacked[:, 0]
        counts = means.new_tensor([count for count, _, _ in pending]).unsqueeze(1)
        factors = means.new_tensor([factor for _, _, factor in pending]).unsqueeze(1)
        total = sum(count for count, _, _ in pending)
        mean = (counts * means).sum(dim=0) / total
        deviation = means - mean
        m2 = (stacked[:, 1] * factors).sum(dim=0) + (counts * deviation * deviation).sum(dim=0)
        self.merge(total, mean, m2, batches=len(pending))

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


def _label(name: str, layer: _BatchNorm) -> str:
    return f"BN layer {display_name(name)} ({type(layer).__name__}({layer.num_features}))"


def check_layer_input(name: str, layer: _BatchNorm, x: Any) -> int:
    """Values per channel in ``x``; ``TypeError``/``ValueError`` naming the layer if unusable."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{_label(name, layer)} was called on a {type(x).__name__}, not a tensor")
    shape = x.shape
    if len(shape) < 2 or shape[1] != layer.num_features:
        raise ValueError(
            f"{_label(name, layer)}: expected input of shape (N, {layer.num_features}, ...), "
            f"got {tuple(shape)}"
        )
    count = x.numel() // shape[1]
    if count < 2:
        raise ValueError(
            f"{_label(name, layer)}: input of shape {tuple(shape)} has {count} value per "
            "channel; batch statistics need at least 2 (drop batches of one sample, or choose "
            "max_samples so that the last batch keeps 2 or more)"
        )
    return count


def kernel_writes_moments(layer: _BatchNorm) -> bool:
    """True when ``layer``'s forward is torch's ``_BatchNorm.forward``, an
    ``nn.SyncBatchNorm`` outside ``torch.distributed`` (it then calls the same kernel) or
    bnstats' own (see :func:`_hand_moments_to_kernel`), with float32/float64 buffers: with
    update weight 1 its kernel leaves each batch's moments in its buffers."""
    if is_lazy_uninitialized(layer) or layer.running_var.dtype not in _KERNEL_BUFFER_DTYPES:
        return False
    forward = type(layer).forward
    if forward is nn.SyncBatchNorm.forward:
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        return not distributed  # synced statistics would not be this process's
    return forward is _BatchNorm.forward or forward is _EstimatorBatchNorm.forward


def _take_kernel_moments(moments: LayerMoments) -> None:
    """Gather the mean and unbiased variance the kernel wrote at the layer's last call."""
    count, moments._awaiting = moments._awaiting, None
    layer = moments.layer
    # one copy of both buffers, which the next call overwrites; widened in flush
    moments.add_batch(count, torch.stack((layer.running_mean, layer.running_var)), unbiased=True)


def _statistics_hook(
    moments: LayerMoments, state: PreservedState, order: list[int], kernel: bool, float64: bool
) -> Any:
    """The pre-hook: gather what the kernel wrote at the layer's previous call (still in its
    buffers: one hook per layer, not two), check the input, then either leave this call's
    moments to the kernel or take them here."""

    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if moments._awaiting is not None:
            _take_kernel_moments(moments)
        state.record_buffers(moments.name)  # a LazyBatchNorm is initialized by now
        x = args[0] if args else kwargs.get("input")
        count = check_layer_input(moments.name, moments.layer, x)
        if kernel and x.dtype == module.running_var.dtype:
            moments._awaiting = count
        else:
            moments.add_batch(count, torch.stack(batch_moments(x.detach(), float64)))
        moments.calls_this_forward += 1
        if moments.first_reached is None:
            order[0] += 1
            moments.first_reached = order[0]

    return hook


def _hand_moments_to_kernel(layers: dict[str, _BatchNorm], on: bool = True) -> None:
    """Update weight 1 (torch's layers: ``momentum = 1``, put back by
    :class:`PreservedState`; bnstats' layers: ``_moments_from_kernel``, cleared again with
    ``on=False``) and finite buffers (``0 * NaN`` would persist)."""
    for layer in layers.values():
        if isinstance(layer, _EstimatorBatchNorm):
            if on:
                layer._moments_from_kernel = True
            else:
                layer.__dict__.pop("_moments_from_kernel", None)
        elif on:
            layer.momentum = 1.0
    if on:
        with torch.no_grad():
            for layer in layers.values():
                layer.running_mean.zero_()
                layer.running_var.fill_(1.0)


class _KernelMoments:
    """Context: :func:`_hand_moments_to_kernel` on entry, undone for bnstats' layers on exit
    (torch's momenta and all buffers are put back by :class:`PreservedState`)."""

    def __init__(self, layers: dict[str, _BatchNorm]) -> None:
        self.layers = layers

    def __enter__(self) -> None:
        _hand_moments_to_kernel(self.layers)

    def __exit__(self, *exc_info: object) -> None:
        _hand_moments_to_kernel(self.layers, on=False)


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
    :func:`bnstats.torch._layers.batchnorm_train_mode`); autograd is off; each
    batch goes to the model's device; torch's own BN layers have ``momentum = 1`` (see the
    module docstring). The model is left exactly as found, also on error: modes, momenta,
    running buffers, hooks (see :class:`PreservedState`).

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
    kernel = (
        {} if float64_moments else {n: m for n, m in layers.items() if kernel_writes_moments(m)}
    )
    with PreservedState(model, layers) as state, torch.no_grad(), _KernelMoments(kernel):
        batchnorm_train_mode(model, layers)
        for name, layer in layers.items():
            hook = _statistics_hook(moments[name], state, order, name in kernel, float64_moments)
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
        for layer_moments in moments.values():
            if layer_moments._awaiting is not None:
                _take_kernel_moments(layer_moments)
            layer_moments.flush()
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
