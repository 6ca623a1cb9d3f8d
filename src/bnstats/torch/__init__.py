"""PyTorch tools for batch norm's test-time statistics (the optional ``torch`` extra).

- :func:`recalibrate`: exact population statistics for every BN layer, in one pass (or, with
  ``mode="eval"``, as eval-mode inference sees them); :func:`recalibrate_report` says how
  precise they are and how many samples it took;
- :func:`diagnose`: why eval mode does worse than training: the cause, the layers, the
  fix, each measured;
- :func:`audit`: how far each layer's running statistics are from the truth on some data;
- :func:`adapt`: test-time adaptation of the statistics to shifted data;
- :func:`sync_running_stats`: running statistics pooled across torch.distributed ranks
  (recalibrate, audit and adapt also merge their measurements across ranks);
- :func:`fold`: a copy of the model with BN folded into neighbouring conv/linear layers;
- :class:`BatchNorm1d`, :class:`BatchNorm2d`, :class:`BatchNorm3d` and :func:`convert`:
  BN layers whose running statistics follow a bnstats estimator;
- :class:`BatchRenorm2d` (1d, 3d) and :class:`GhostBatchNorm2d` (1d, 3d): for small or
  non-i.i.d. training batches (Ioffe 2017; Hoffer et al. 2017);
- :func:`register_batchnorm`, :func:`register_wrapper`: teach every tool a BN layer class
  or a model wrapper of your own (:mod:`bnstats.torch.kinds`).

The options every pass takes are :class:`PassOptions` (:mod:`bnstats.torch.options`);
:func:`find_batchnorm_layers`, :func:`is_batchnorm` and :func:`unwrap` say which layers and
which model the tools work on.

Every tool leaves the model's modes, momenta and hooks as it found them, and writes its
buffers all at once or not at all.
"""

try:  # one helpful line, not a traceback from deep inside, when the extra is missing
    import torch as _torch  # noqa: F401
except ModuleNotFoundError as _missing:
    if _missing.name != "torch":
        raise
    raise ImportError(
        "bnstats.torch needs PyTorch: pip install torch "
        '(from a checkout of bnstats: pip install ".[torch]")'
    ) from None

from bnstats.torch._layers import find_batchnorm_layers, is_batchnorm, unwrap
from bnstats.torch.adapt import adapt
from bnstats.torch.audit import AuditReport, LayerAudit, audit
from bnstats.torch.convert import ConversionPlan, convert, plan_conversion
from bnstats.torch.diagnose import DiagnoseReport, Finding, LayerEffect, diagnose
from bnstats.torch.distributed import RankError, sync_running_stats
from bnstats.torch.fold import (
    FoldOverflowError,
    FoldReport,
    FoldTraceError,
    fold,
    fold_weights,
)
from bnstats.torch.ghost import GhostBatchNorm1d, GhostBatchNorm2d, GhostBatchNorm3d
from bnstats.torch.kinds import BatchNormKind, register_batchnorm, register_wrapper
from bnstats.torch.modules import BatchNorm1d, BatchNorm2d, BatchNorm3d
from bnstats.torch.options import PassOptions
from bnstats.torch.recalibrate import Recalibration, recalibrate, recalibrate_report
from bnstats.torch.renorm import BatchRenorm1d, BatchRenorm2d, BatchRenorm3d
from bnstats.torch.sync_batchnorm import revert_sync_batchnorm

__all__ = [
    "AuditReport",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "BatchRenorm1d",
    "BatchRenorm2d",
    "BatchRenorm3d",
    "ConversionPlan",
    "DiagnoseReport",
    "Finding",
    "LayerEffect",
    "FoldOverflowError",
    "FoldReport",
    "FoldTraceError",
    "GhostBatchNorm1d",
    "GhostBatchNorm2d",
    "GhostBatchNorm3d",
    "LayerAudit",
    "PassOptions",
    "RankError",
    "Recalibration",
    "adapt",
    "audit",
    "convert",
    "diagnose",
    "fold",
    "fold_weights",
    "plan_conversion",
    "recalibrate",
    "recalibrate_report",
    "revert_sync_batchnorm",
    "sync_running_stats",
    "BatchNormKind",
    "register_batchnorm",
    "register_wrapper",
    "find_batchnorm_layers",
    "is_batchnorm",
    "unwrap",
]
