"""Batch Renormalization (Ioffe 2017) for PyTorch: BatchRenorm1d, BatchRenorm2d, BatchRenorm3d.

Each is bnstats' estimator-driven ``BatchNormNd`` (so a subclass of the matching
``nn.BatchNormNd``, with the same parameters and buffers: state dicts load both ways) whose
training forward normalizes with the batch's statistics and corrects toward the running ones
(see :mod:`bnstats.renorm`)::

    sigma_B = sqrt(var_B + eps);  sigma = sqrt(running_var + eps)
    r = clip(sigma_B / sigma, 1 / rmax, rmax)
    d = clip((mu_B - running_mean) / sigma, -dmax, dmax)
    y = ((x - mu_B) / sigma_B * r + d) * weight + bias

``r`` and ``d`` are computed under ``torch.no_grad()`` from the buffers as they were before this
batch; then the buffers take the batch as the estimator says (default ``EMA(0.1)``, torch's
update; ``momentum=None`` the cumulative average; any ``estimator=``). Eval mode is batch norm.
``num_batches_tracked`` is the schedule's ``step``, read on the device (no host read): a
checkpoint resumes the schedule where it stopped. While ``num_batches_tracked == 0`` the buffers
hold only their initial 0 and 1, and ``r = 1``, ``d = 0``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F

from bnstats.renorm import RenormSchedule, as_schedule, renorm_correction
from bnstats.torch.kinds import BatchNormKind
from bnstats.torch.modules import BatchNorm1d, BatchNorm2d, BatchNorm3d


def batch_renorm(
    input: Tensor,
    r: Tensor,
    d: Tensor,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    """Batch Renorm's training forward for given per-channel ``r``, ``d`` (used detached: no
    gradient flows through them)::

        x_hat = (input - mu_B) / sqrt(var_B + eps)       torch's batch_norm kernel
        out   = (x_hat * r + d) * weight + bias

    ``running_mean``/``running_var``, if given, take the batch as in ``nn.BatchNorm`` with
    weight ``momentum``."""
    x_hat = F.batch_norm(input, running_mean, running_var, None, None, True, momentum, eps)
    return _corrected(x_hat, r, d, weight, bias)


def _corrected(
    x_hat: Tensor, r: Tensor, d: Tensor, weight: Tensor | None, bias: Tensor | None
) -> Tensor:
    """``(x_hat * r + d) * weight + bias``, per channel (axis 1)."""
    shape = (1, -1) + (1,) * (x_hat.dim() - 2)
    out = x_hat * r.detach().view(shape) + d.detach().view(shape)
    if weight is not None:
        out = out * weight.view(shape)
    if bias is not None:
        out = out + bias.view(shape)
    return out


def schedule_limits(schedule: RenormSchedule, step: Tensor) -> tuple[Tensor, Tensor]:
    """:meth:`RenormSchedule.limits` for a ``step`` held on the device (float64 tensors)."""
    step = step.to(torch.float64)
    warmup = schedule.warmup_steps

    def progress(full_at: int) -> Tensor:
        ramp = (step - warmup) / max(full_at - warmup, 1)
        ramp = torch.where(step >= full_at, torch.ones_like(step), ramp)
        return torch.where(step < warmup, torch.zeros_like(step), ramp)

    rmax = 1.0 + (schedule.rmax - 1.0) * progress(schedule.rmax_full_at)
    return rmax, schedule.dmax * progress(schedule.dmax_full_at)


class _RenormMixin:
    """Batch Renorm's training forward on bnstats' estimator-driven BN base."""

    _counts_refused_batches = False

    def __init__(
        self,
        num_features: int,
        *args: Any,
        schedule: RenormSchedule | dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(num_features, *args, **kwargs)  # type: ignore[call-arg]
        if not self.track_running_stats:
            raise ValueError(
                f"{type(self).__name__}({num_features}) needs running statistics to correct "
                "toward: track_running_stats must be True"
            )
        self.schedule = as_schedule(schedule)
        self.last_r: Tensor | None = None
        self.last_d: Tensor | None = None

    def _train_forward(self, input: Tensor) -> Tensor:
        r, d = self.correction(input)
        x_hat, bad = self._normalize_and_update(input, affine=False)
        weight, bias = self.weight, self.bias
        self._defer_raise(input, bad)
        return _corrected(x_hat, r, d, weight, bias)

    @torch.no_grad()
    def correction(self, input: Tensor, step: int | Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Per-channel ``(r, d)`` for the batch ``input`` at ``step`` (default: now, that is
        ``num_batches_tracked``), from the current buffers; constants for autograd. Moments
        in float32 or wider; nothing is read on the host."""
        x = input.detach()
        if x.dtype in (torch.float16, torch.bfloat16):
            x = x.float()
        step = self.num_batches_tracked if step is None else torch.as_tensor(step)
        var, mu = torch.var_mean(x, dim=[0, *range(2, x.dim())], correction=0)
        rmax, dmax = (limit.to(x.dtype) for limit in schedule_limits(self.schedule, step))
        running_mean, running_var = self.running_mean.to(x.dtype), self.running_var.to(x.dtype)
        r, d = renorm_correction(mu, var, running_mean, running_var, self.eps, rmax, dmax)
        started = step.to(x.device) > 0
        r = torch.where(started, r, torch.ones_like(r))
        d = torch.where(started, d, torch.zeros_like(d))
        if self._pass_weight is None:
            self.last_r, self.last_d = r, d
        return r.to(input.dtype), d.to(input.dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, schedule={self.schedule}"


class BatchRenorm1d(_RenormMixin, BatchNorm1d):
    """Batch Renormalization over (N, C) or (N, C, L) input; see :mod:`bnstats.torch.renorm`."""

    batchnorm_kind = BatchNormKind(fold=True)


class BatchRenorm2d(_RenormMixin, BatchNorm2d):
    """Batch Renormalization over (N, C, H, W) input; see :mod:`bnstats.torch.renorm`."""

    batchnorm_kind = BatchNormKind(fold=True, rank=4)


class BatchRenorm3d(_RenormMixin, BatchNorm3d):
    """Batch Renormalization over (N, C, D, H, W) input; see :mod:`bnstats.torch.renorm`."""

    batchnorm_kind = BatchNormKind(fold=True, rank=5)


__all__ = ["BatchRenorm1d", "BatchRenorm2d", "BatchRenorm3d", "batch_renorm", "schedule_limits"]
