"""Flax tools for batch norm's test-time statistics (the optional ``flax`` extra).

- :func:`recalibrate_nnx`: every ``nnx.BatchNorm``'s ``mean`` and ``var`` written in place
  as the exact population statistics of its input (``mode="eval"``: as inference sees it);
- :func:`recalibrate_linen`: new Linen ``variables`` whose ``batch_stats`` hold them.

Flax's convention (``bnstats.conventions``): ``momentum`` weighs the old average, the stored
variance is over all N values (biased), ``epsilon`` defaults to 1e-5. Imports no torch.
"""

from bnstats.flax.linen import recalibrate_linen
from bnstats.flax.nnx import recalibrate_nnx

__all__ = ["recalibrate_linen", "recalibrate_nnx"]
