"""bnstats: batch normalization's test-time statistics.

During training batch norm normalizes each layer with the mini-batch's own ``mu`` and
``var``; at test time it needs a fixed estimate of them. bnstats computes, checks and
recomputes those estimates: the estimators live in :mod:`bnstats.stats`, the NumPy
functions in :mod:`bnstats.functional`, a from-scratch NumPy network in
:mod:`bnstats.engine` and the PyTorch tools in :mod:`bnstats.torch` (optional extra).
"""

from bnstats import functional
from bnstats.stats import (
    EMA,
    CumulativeAverage,
    Estimator,
    FixedStatistics,
    NonFiniteStatisticsError,
    Population,
    decay_from_momentum,
    momentum_from_decay,
)

__version__ = "0.1.0"

__all__ = [
    "EMA",
    "CumulativeAverage",
    "Estimator",
    "FixedStatistics",
    "NonFiniteStatisticsError",
    "Population",
    "__version__",
    "decay_from_momentum",
    "functional",
    "momentum_from_decay",
]
