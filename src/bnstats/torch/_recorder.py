"""What runs at each BN layer call of a pass: the moments taken (:class:`Recorder`), and the
pass's own forward for the kinds whose training forward is torch's kernel then their tail
modules (:func:`kernel_forward`)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from bnstats.torch._batch_moments import (
    batch_moments,
    check_layer_input,
    kernel_measures,
)
from bnstats.torch._layer_pass import LayerPass, flush_together, wide_copy
from bnstats.torch._layers import (
    PreservedState,
    is_lazy_uninitialized,
)
from bnstats.torch._level import Level, normalize_with
from bnstats.torch._partial_input import has_own_forward, watch_partial_input
from bnstats.torch.kinds import plain_forward_tail
from bnstats.torch.modules import EstimatorBatchNorm
from bnstats.torch.options import PassOptions

_SWAPPED = ("running_mean", "running_var", "num_batches_tracked")
_TORCH_FORWARD = nn.modules.batchnorm._BatchNorm.forward


class Recorder:
    """The hooks of one pass and its batch count: per call of a measured layer, gather what
    the kernel wrote at the layer's previous call (one hook per layer, not two), check the
    input, then leave this call's moments to the kernel or take them here; in an eval-mode
    level, set the statistics the call normalizes with by the level's rule."""

    def __init__(
        self, state: PreservedState, kernel: set[str], options: PassOptions, level: Level
    ) -> None:
        self.state, self.kernel, self.options, self.level = state, kernel, options, level
        self.watched: list[LayerPass] = []
        self.batch_index = 0
        self.reached = 0
        self.reference_run = False
        self.original: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def watch(self, moments: LayerPass, own_forward: bool = False) -> None:
        """Measure ``moments.layer`` at each call (in an exact level its output becomes NaN);
        ``own_forward``: through the pass's own forward in place of torch's
        (:func:`kernel_forward`), else through a forward pre-hook."""
        self.watched.append(moments)
        layer = moments.layer
        if own_forward:
            layer.__dict__["forward"] = kernel_forward(self, moments)
            self.state.add_hook(_InstanceForward(layer))
            return
        self.state.add_hook(layer.register_forward_pre_hook(self._hook(moments), with_kwargs=True))
        if self.level.training and has_own_forward(layer):
            for handle in watch_partial_input(moments.name, layer):
                self.state.add_hook(handle)
        if not self.level.training and self.level.rule == "exact":
            self.state.add_hook(layer.register_forward_hook(_unsettled_output))

    def run(self, forward: Callable[[nn.Module, Any], Any], model: nn.Module, batch: Any) -> None:
        """``forward(model, batch)`` on the next batch, counting each layer's calls in it (in a
        tracked level after the reference run, see :class:`Level`)."""
        for moments in self.watched:
            moments.calls_this_forward = 0
        if not self.level.training and self.level.rule == "tracked":
            for moments in self.watched:
                moments._reference.clear()
            normalize_with({m.name: m.layer for m in self.watched}, self.level.statistics)
            self.reference_run = True
            try:
                forward(model, batch)
            finally:
                self.reference_run = False
        forward(model, batch)
        self.batch_index += 1

    def finish(self) -> None:
        """Take what the kernel wrote at each layer's last call, and merge what is gathered."""
        for moments in self.watched:
            moments.take_kernel_moments(self.options.nonfinite)
        flush_together(self.watched)

    def _hook(self, moments: LayerPass) -> Callable[..., None]:
        def pre_hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            x = args[0] if args else kwargs.get("input")
            if self.reference_run:
                if isinstance(x, torch.Tensor) and x.dim() >= 2:
                    moments._reference.append(batch_moments(x.detach()))
                return
            if moments._awaiting is not None:
                moments.take_kernel_moments(self.options.nonfinite)
            self.state.record_buffers(moments.name)  # a LazyBatchNorm is initialized by now
            count = check_layer_input(moments, x, self.level.least_values)
            if moments.spread.center is None:
                moments.spread.center = wide_copy(module.running_mean)
            if moments.name in self.kernel and kernel_measures(x, module.running_var.dtype):
                if isinstance(module, EstimatorBatchNorm):
                    moments._awaiting = (self.batch_index, count)
                else:
                    self._lend_slot(moments, module, count)
            elif self._into_block(module, x, count):
                slot_mean, slot_var = moments.kernel_slot(self.batch_index, count)
                torch.batch_norm_update_stats(x.detach(), slot_mean, slot_var, 1.0)
            else:
                mean, var = batch_moments(x.detach(), self._float64_moments())
                moments.add_batch(self.batch_index, count, torch.stack((mean, var * count)))
                if not self.level.training:
                    self._normalize_call(moments, module, mean, var, count)
            self.count_call(moments)

        return pre_hook

    def _float64_moments(self) -> bool:
        """Moments in float64 with ``float64_moments``, and always under the ``"own"`` rule:
        eval mode's one batch holds all the data in one call, and one float32 sum over it
        carries a rounding error that a sensitive model turns into another fixed point (a
        trained mobilenet_v2 on 32,768 digits: the check pass moved 2.5e-4 from the one
        batch's statistics; 2.6e-13 with its moments in float64), where a pass's many batch
        sums average theirs out."""
        return self.options.float64_moments or self.level.rule == "own"

    def _into_block(self, module: nn.Module, x: torch.Tensor, count: int) -> bool:
        """True where an eval-mode level measures the call into the layer's block of rows as
        torch's kernel computes it (``torch.batch_norm_update_stats`` with the batch's row as
        running buffers, ``momentum = 1``: the mean and unbiased variance, as training's kernel
        writes them), so that the layers merge side by side (:func:`flush_together`): a
        ``"fixed"`` or ``"exact"`` level (the call normalizes with statistics set before it,
        nothing read back), 2 values per channel or more, an input the kernel measures as
        the pass would (:func:`kernel_measures`; not ``float64_moments``)."""
        return (
            not self.level.training
            and self.level.rule in ("fixed", "exact")
            and count >= 2
            and not self.options.float64_moments
            and kernel_measures(x, module.running_var.dtype)
        )

    def count_call(self, moments: LayerPass) -> None:
        """One more call of ``moments.layer`` in this forward (the first reach numbered)."""
        calls = moments.calls_this_forward = moments.calls_this_forward + 1
        if calls > moments.max_calls_per_forward:
            moments.max_calls_per_forward = calls
        if moments.first_reached is None:
            self.reached += 1
            moments.first_reached = self.reached

    def _lend_slot(self, moments: LayerPass, module: nn.Module, count: int) -> None:
        """Point the layer's running buffers at this batch's slot (:meth:`LayerPass.kernel_slot`),
        and hide ``num_batches_tracked`` from torch's own forward (with ``momentum = 1`` it
        reads nothing else): the call costs the kernel's operations and no more. The layer's
        own buffers come back in :meth:`return_buffers`."""
        buffers = module._buffers
        if moments._own_buffers is None:
            moments._own_buffers = {key: buffers.get(key) for key in _SWAPPED}
            if type(module).forward is _TORCH_FORWARD:
                buffers["num_batches_tracked"] = None
        buffers["running_mean"], buffers["running_var"] = moments.kernel_slot(
            self.batch_index, count
        )

    def return_buffers(self) -> None:
        """Give every layer its own running buffers back (after the pass, also on error)."""
        for moments in self.watched:
            own, moments._own_buffers = moments._own_buffers, None
            if own is not None:
                for key, buffer in own.items():
                    if key in moments.layer._buffers:
                        moments.layer._buffers[key] = buffer

    def _normalize_call(
        self,
        moments: LayerPass,
        module: nn.Module,
        mean: torch.Tensor,
        var: torch.Tensor,
        count: int,
    ) -> None:
        """The statistics this call normalizes with, by the level's rule (:class:`Level`)."""
        rule = self.level.rule
        if rule in ("batch", "own"):
            if moments.name not in self.original:  # for inputs of one value per channel
                self.original[moments.name] = (
                    module.running_mean.detach().clone(),
                    module.running_var.detach().clone(),
                )
            if count < 2:
                statistics = self.original[moments.name]
            elif rule == "batch":
                statistics = (mean, var)
            else:  # the population's unbiased var = var * count / (count - 1)
                statistics = (mean, var * (count / (count - 1)))
                if self.level.correction is not None:
                    statistics = self.level.correction(moments.name, statistics)
        elif rule == "tracked":
            call, base = moments.calls_this_forward, self.level.base.get(moments.name)
            if base is None or call >= len(moments._reference):
                return
            statistics = transported(base, moments._reference[call], (mean, var))
        else:
            return
        module.running_mean.copy_(statistics[0])
        module.running_var.copy_(statistics[1])


def takes_own_forward(layer: nn.Module) -> bool:
    """True for a layer whose forward is its kind's plain one (torch's BatchNorm1d/2d/3d and
    timm's BatchNormAct2d, subclasses that keep it; see
    :func:`bnstats.torch.kinds.plain_forward_tail`), not bnstats' own: in a train-mode pass
    it runs :func:`kernel_forward` instead, the same kernel call and tail without the
    bookkeeping around them."""
    return (
        plain_forward_tail(layer) is not None
        and not isinstance(layer, EstimatorBatchNorm)
        and not is_lazy_uninitialized(layer)
    )


def kernel_forward(recorder: Recorder, moments: LayerPass) -> Callable[[torch.Tensor], Any]:
    """The forward of a :func:`takes_own_forward` layer during a train-mode pass: the call
    torch's forward makes in training, ``torch.batch_norm(input, weight, bias, mean, var,
    True, 1.0, eps)``, with ``mean, var`` this batch's row of the layer's block
    (:meth:`LayerPass.kernel_slot`), where the kernel writes the batch's mean and unbiased
    variance; the layer's own buffers and ``num_batches_tracked`` are not touched. An input
    the kernel would not measure exactly (another dtype than the buffers, channels-last on
    the CPU) is measured by :func:`batch_moments` and normalized without running buffers.
    Then the layer's tail modules, in order (timm's ``drop`` and ``act``; a missing one or
    None skipped, as those forwards do). Same output as the layer's own forward; checks
    first, naming the layer (:func:`check_layer_input`, then the layer's dimension check)."""
    layer = moments.layer
    kernel_dtype = layer.running_var.dtype  # the pass writes none of the layer's buffers
    cudnn = torch.backends.cudnn.enabled  # as torch's forward reads it, once per pass
    tail = [
        module
        for name in plain_forward_tail(layer) or ()
        if (module := layer._modules.get(name)) is not None
    ]

    def forward(input: torch.Tensor) -> Any:  # noqa: A002 (torch's own name for it)
        count = check_layer_input(moments, input)
        layer._check_input_dim(input)
        mean = var = None
        if kernel_measures(input, kernel_dtype):
            mean, var = moments.kernel_slot(recorder.batch_index, count)
        else:
            taken = batch_moments(input.detach(), recorder.options.float64_moments)
            moments.add_batch(
                recorder.batch_index, count, torch.stack((taken[0], taken[1] * count))
            )
        recorder.count_call(moments)
        output = torch.batch_norm(
            input, layer.weight, layer.bias, mean, var, True, 1.0, layer.eps, cudnn
        )
        for module in tail:
            output = module(output)
        return output

    return forward


class _InstanceForward:
    """Removes a pass's :func:`kernel_forward` from its layer (as a hook handle would)."""

    def __init__(self, layer: nn.Module) -> None:
        self.layer = layer

    def remove(self) -> None:
        self.layer.__dict__.pop("forward", None)


def transported(
    base: tuple[torch.Tensor, torch.Tensor],
    reference: tuple[torch.Tensor, torch.Tensor],
    now: tuple[torch.Tensor, torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """``base`` (a population's ``mean``, ``var``) moved by the per-channel affine map that
    takes a batch's moments from ``reference`` to ``now`` (each ``mean``, biased ``var``)::

        a**2 = v_t / v_r  (1 where v_r = 0),   mean = m_t + a * (base_mean - m_r),
        var = base_var * a**2
    """
    (base_mean, base_var), (m_r, v_r), (m_t, v_t) = base, reference, now
    base_mean, base_var = base_mean.to(m_t), base_var.to(m_t)
    ratio = torch.where(v_r > 0, v_t / torch.where(v_r > 0, v_r, 1.0), 1.0)
    return m_t + ratio.sqrt() * (base_mean - m_r), base_var * ratio


def _unsettled_output(module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
    """An eval-mode level: the output of a layer whose statistics are not final yet is NaN,
    so that every layer computed from it sees NaN and waits for a later level."""
    return torch.full_like(output, math.nan) if isinstance(output, torch.Tensor) else output
