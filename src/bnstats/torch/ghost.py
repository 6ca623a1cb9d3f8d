"""Ghost Batch Norm (Hoffer, Hubara & Soudry 2017) for PyTorch: GhostBatchNorm1d/2d/3d.

Each is a subclass of the matching ``nn.BatchNormNd`` with the same parameters and buffers, so
state dicts load both ways and eval mode is batch norm, unchanged. Whenever the batch's own
statistics are used (training, or no running statistics), the batch is cut into virtual batches
of ``ghost_size`` rows along axis 0 (:func:`bnstats.ghost.ghost_sizes`: the last may be smaller,
a last one of a single row joins the one before) and ``nn.BatchNorm``'s own forward runs on each
in turn. So each virtual batch is normalized by its own ``mu`` and biased ``var``, and the
running statistics take one update per virtual batch, as if each had been a training step:
``num_batches_tracked`` counts virtual batches, which keeps ``momentum=None`` (the cumulative
average, ``1 / num_batches_tracked``) an equal-weight average over them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from bnstats.ghost import check_ghost_size, ghost_sizes
from bnstats.torch._input import check_input


class _GhostMixin:
    """Ghost batch norm's forward on top of an ``nn.BatchNormNd``."""

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
        ghost_size: int,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device, dtype, **kwargs
        )
        self.ghost_size = check_ghost_size(ghost_size, f"{type(self).__name__}({num_features})")

    def forward(self, input: Tensor) -> Tensor:
        no_buffers = self.running_mean is None and self.running_var is None
        batch_stats = self.training or no_buffers
        check_input(self, input, batch_stats=batch_stats)
        if not batch_stats:
            return super().forward(input)
        outputs = []
        for chunk in input.split(ghost_sizes(input.shape[0], self.ghost_size)):
            outputs.append(super().forward(chunk))
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, ghost_size={self.ghost_size}"


class GhostBatchNorm1d(_GhostMixin, nn.BatchNorm1d):
    """Ghost Batch Norm over (N, C) or (N, C, L) input; see :mod:`bnstats.torch.ghost`."""


class GhostBatchNorm2d(_GhostMixin, nn.BatchNorm2d):
    """Ghost Batch Norm over (N, C, H, W) input; see :mod:`bnstats.torch.ghost`."""


class GhostBatchNorm3d(_GhostMixin, nn.BatchNorm3d):
    """Ghost Batch Norm over (N, C, D, H, W) input; see :mod:`bnstats.torch.ghost`."""


__all__ = ["GhostBatchNorm1d", "GhostBatchNorm2d", "GhostBatchNorm3d"]
