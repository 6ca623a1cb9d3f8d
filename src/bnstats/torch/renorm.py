"""Batch Renormalization (Ioffe 2017) for PyTorch: BatchRenorm1d, BatchRenorm2d, BatchRenorm3d.

Each is a subclass of the matching ``nn.BatchNormNd`` with the same parameters and buffers
(``weight``, ``bias``, ``running_mean``, ``running_var``, ``num_batches_tracked``), so state
dicts load both ways, ``isinstance(m, nn.BatchNorm2d)`` holds, and eval mode is batch norm,
unchanged. Training normalizes with the batch's statistics and corrects toward the running
ones (see :mod:`bnstats.renorm`)::

    sigma_B = sqrt(var_B + eps);  sigma = sqrt(running_var + eps)
    r = clip(sigma_B / sigma, 1 / rmax, rmax)
    d = clip((mu_B - running_mean) / sigma, -dmax, dmax)
    y = ((x - mu_B) / sigma_B * r + d) * weight + bias

``r`` and ``d`` are computed under ``torch.no_grad()`` from the buffers as they were before this
batch; then the buffers take the batch exactly as ``nn.BatchNorm`` does (same kernel, same
``momentum`` and ``momentum=None`` rules, unbiased ``running_var``). ``num_batches_tracked``
counts training batches, as in batch norm, and is the schedule's ``step``: a checkpoint resumes
the schedule where it stopped, and a module converted from a long-trained ``nn.BatchNorm2d``
starts with its ramp done. While ``num_batches_tracked == 0`` the buffers hold only their
initial 0 and 1, and ``r = 1``, ``d = 0``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from bnstats.renorm import RenormSchedule, as_schedule, renorm_correction
from bnstats.torch._input import check_input


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
    weight ``momentum``. The modules compute ``r, d`` (:meth:`_RenormMixin.correction`) and call
    this."""
    x_hat = F.batch_norm(input, running_mean, running_var, None, None, True, momentum, eps)
    shape = (1, -1) + (1,) * (input.dim() - 2)
    out = x_hat * r.detach().view(shape) + d.detach().view(shape)
    if weight is not None:
        out = out * weight.view(shape)
    if bias is not None:
        out = out + bias.view(shape)
    return out


class _RenormMixin:
    """Batch Renorm's training forward on top of an ``nn.BatchNormNd``."""

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: Any = None,
        dtype: Any = None,
        *,
        schedule: RenormSchedule | dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        if not track_running_stats:
            raise ValueError(
                f"{type(self).__name__}({num_features}) needs running statistics to correct "
                "toward: track_running_stats must be True"
            )
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device, dtype, **kwargs
        )
        self.schedule = as_schedule(schedule)
        self.last_r: Tensor | None = None
        self.last_d: Tensor | None = None

    def forward(self, input: Tensor) -> Tensor:
        check_input(self, input, batch_stats=self.training)
        if not self.training:
            return super().forward(input)
        step = int(self.num_batches_tracked)
        r, d = self.correction(input, step)
        self.num_batches_tracked.add_(1)
        factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        return batch_renorm(
            input,
            r,
            d,
            self.weight,
            self.bias,
            self.running_mean,
            self.running_var,
            factor,
            self.eps,
        )

    @torch.no_grad()
    def correction(self, input: Tensor, step: int | None = None) -> tuple[Tensor, Tensor]:
        """Per-channel ``(r, d)`` for the batch ``input`` at ``step`` (default: now), from the
        current buffers; constants for autograd. Moments in float32 or wider."""
        step = int(self.num_batches_tracked) if step is None else step
        x = input.detach()
        if x.dtype in (torch.float16, torch.bfloat16):
            x = x.float()
        if step == 0:
            r = torch.ones(x.shape[1], dtype=x.dtype, device=x.device)
            d = torch.zeros_like(r)
        else:
            var, mu = torch.var_mean(x, dim=[0, *range(2, x.dim())], correction=0)
            rmax, dmax = self.schedule.limits(step)
            running_mean, running_var = self.running_mean.to(x.dtype), self.running_var.to(x.dtype)
            r, d = renorm_correction(mu, var, running_mean, running_var, self.eps, rmax, dmax)
        self.last_r, self.last_d = r, d
        return r.to(input.dtype), d.to(input.dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, schedule={self.schedule}"


class BatchRenorm1d(_RenormMixin, nn.BatchNorm1d):
    """Batch Renormalization over (N, C) or (N, C, L) input; see :mod:`bnstats.torch.renorm`."""


class BatchRenorm2d(_RenormMixin, nn.BatchNorm2d):
    """Batch Renormalization over (N, C, H, W) input; see :mod:`bnstats.torch.renorm`."""


class BatchRenorm3d(_RenormMixin, nn.BatchNorm3d):
    """Batch Renormalization over (N, C, D, H, W) input; see :mod:`bnstats.torch.renorm`."""


__all__ = ["BatchRenorm1d", "BatchRenorm2d", "BatchRenorm3d", "batch_renorm"]
