"""Keras 3 tools for batch norm's test-time statistics (the optional ``keras`` extra).

- :func:`recalibrate`: exact population statistics for every ``BatchNormalization`` layer,
  written into ``moving_mean`` and ``moving_variance`` (``mode="eval"``: as inference sees
  them);
- :func:`audit`: how far each layer's moving statistics are from the truth on some data.

Works on every Keras 3 backend (JAX, NumPy, TensorFlow, PyTorch); imports neither torch nor
TensorFlow itself. Keras' convention (``bnstats.conventions``): ``momentum`` weighs the old
average, the stored variance is over all N values (biased), ``epsilon`` defaults to 1e-3.
"""

from bnstats._audit import AuditReport, LayerAudit
from bnstats.keras.audit import audit
from bnstats.keras.recalibrate import recalibrate

__all__ = ["AuditReport", "LayerAudit", "audit", "recalibrate"]
