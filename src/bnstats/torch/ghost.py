"""Ghost Batch Norm (Hoffer, Hubara & Soudry 2017) for PyTorch: GhostBatchNorm1d/2d/3d.

Each is bnstats' estimator-driven ``BatchNormNd`` (a subclass of the matching
``nn.BatchNormNd`` with the same parameters and buffers: state dicts load both ways; eval mode
is batch norm). Whenever the batch's own statistics are used (training, or no running
statistics), the batch is cut into virtual batches of ``ghost_size`` rows along axis 0
(:func:`bnstats.ghost.ghost_sizes`: the last may be smaller, a last one of a single row joins
the one before) and each is normalized by its own ``mu`` and biased ``var``; the running
statistics take one update per virtual batch, with the estimator's weight, as if each had been
a training step: ``num_batches_tracked`` counts virtual batches, which keeps the cumulative
average (``momentum=None``) an equal-weight average over them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from bnstats.ghost import check_ghost_size, ghost_sizes
from bnstats.torch.kinds import BatchNormKind
from bnstats.torch.modules import BatchNorm1d, BatchNorm2d, BatchNorm3d


class _GhostMixin:
    """Ghost batch norm's forward on bnstats' estimator-driven BN base."""

    _counts_refused_batches = False

    def __init__(self, num_features: int, *args: Any, ghost_size: int, **kwargs: Any) -> None:
        super().__init__(num_features, *args, **kwargs)  # type: ignore[call-arg]
        self.ghost_size = check_ghost_size(ghost_size, f"{type(self).__name__}({num_features})")

    def forward(self, input: Tensor) -> Tensor:
        if self.running_mean is None and self.running_var is None:
            self._check_input(input, batch_stats=True)  # no buffers: ghosts in eval mode too
            return self._in_ghosts(input, lambda chunk: self._batch_norm(chunk, False, True, 0.0))
        return super().forward(input)

    def _train_forward(self, input: Tensor) -> Tensor:
        def one(chunk: Tensor) -> Tensor:
            output, bad = self._normalize_and_update(chunk)
            self._defer_raise(chunk, bad)  # each virtual batch its own step of the host count
            return output

        return self._in_ghosts(input, one)

    def _in_ghosts(self, input: Tensor, normalize: Any) -> Tensor:
        outputs = [
            normalize(chunk) for chunk in input.split(ghost_sizes(input.shape[0], self.ghost_size))
        ]
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, ghost_size={self.ghost_size}"


class GhostBatchNorm1d(_GhostMixin, BatchNorm1d):
    """Ghost Batch Norm over (N, C) or (N, C, L) input; see :mod:`bnstats.torch.ghost`."""

    batchnorm_kind = BatchNormKind(fold=True)


class GhostBatchNorm2d(_GhostMixin, BatchNorm2d):
    """Ghost Batch Norm over (N, C, H, W) input; see :mod:`bnstats.torch.ghost`."""

    batchnorm_kind = BatchNormKind(fold=True, rank=4)


class GhostBatchNorm3d(_GhostMixin, BatchNorm3d):
    """Ghost Batch Norm over (N, C, D, H, W) input; see :mod:`bnstats.torch.ghost`."""

    batchnorm_kind = BatchNormKind(fold=True, rank=5)


__all__ = ["GhostBatchNorm1d", "GhostBatchNorm2d", "GhostBatchNorm3d"]
