"""Every engine layer class by its ``kind``: what a checkpoint can hold."""

from __future__ import annotations

from bnstats.engine.ghost import GhostBatchNorm
from bnstats.engine.layers import BatchNorm, Layer, Linear, ReLU
from bnstats.engine.renorm import BatchRenorm

LAYER_KINDS: dict[str, type[Layer]] = {
    cls.kind: cls for cls in (Linear, ReLU, BatchNorm, BatchRenorm, GhostBatchNorm)
}
"""Layer classes by ``kind``, for checkpoints."""
