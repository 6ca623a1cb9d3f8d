"""Make a pass over the model purely local: no collective inside any forward.

Two kinds of module communicate inside their forward, which a pass over per-rank data with
uneven batch counts must not do (a rank with fewer batches stops calling, the others wait):

- ``DistributedDataParallel`` broadcasts rank 0's buffers before a forward (the first one
  after it is built, and every one that follows a forward run with autograd on), a
  collective inside the call that would also overwrite the running buffers;
- ``nn.SyncBatchNorm`` in training mode, under an initialized process group, all-gathers
  each batch's statistics (a collective per call) and normalizes with the statistics of
  the global batch; on the CPU it refuses to run at all.

:func:`bnstats.torch._layers.unwrap` gives the module inside ``DistributedDataParallel``,
and :func:`local_batch_statistics` makes every
``SyncBatchNorm`` run the forward of ``nn.BatchNorm`` (normalize with the local batch's
statistics, ``F.batch_norm``) for the duration of the pass, then puts its own forward back,
also on error. That local path is exactly what ``SyncBatchNorm`` computes when no group is
initialized, so each batch is normalized as a single process would normalize it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

_ABSENT = object()


@contextmanager
def local_batch_statistics(model: nn.Module) -> Iterator[None]:
    """Within the block, every ``nn.SyncBatchNorm`` in ``model`` normalizes with its local
    batch's statistics, without any collective; afterwards (also on error) each has its own
    forward back, and an instance attribute ``forward`` set before is restored as it was."""
    layers = [m for m in model.modules() if isinstance(m, nn.SyncBatchNorm)]
    saved = [(layer, layer.__dict__.get("forward", _ABSENT)) for layer in layers]
    try:
        for layer in layers:
            layer.forward = _BatchNorm.forward.__get__(layer)
        yield
    finally:
        for layer, previous in saved:
            if previous is _ABSENT:
                layer.__dict__.pop("forward", None)
            else:
                layer.forward = previous
