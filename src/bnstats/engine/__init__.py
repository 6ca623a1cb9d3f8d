"""The from-scratch NumPy network of the lecture: Linear, BatchNorm, ReLU, optimizers,
a mini-batch training loop that records every batch's statistics, and checkpoints; for small
or correlated batches, BatchRenorm and GhostBatchNorm."""

from bnstats.engine.checkpoint import CheckpointError
from bnstats.engine.ghost import GhostBatchNorm
from bnstats.engine.layers import BATCH, BatchNorm, Layer, Linear, ReLU
from bnstats.engine.network import Network, NormFactory, softmax_cross_entropy
from bnstats.engine.optim import SGD, Adam, Momentum, Optimizer
from bnstats.engine.renorm import BatchRenorm
from bnstats.engine.training import History, fit

__all__ = [
    "BATCH",
    "SGD",
    "Adam",
    "BatchNorm",
    "BatchRenorm",
    "CheckpointError",
    "GhostBatchNorm",
    "History",
    "Layer",
    "Linear",
    "Momentum",
    "Network",
    "NormFactory",
    "Optimizer",
    "ReLU",
    "fit",
    "softmax_cross_entropy",
]
