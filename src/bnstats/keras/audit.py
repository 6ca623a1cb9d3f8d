"""How far each Keras BN layer's moving statistics are from the truth on some data."""

from __future__ import annotations

from typing import Any, Literal

from bnstats._audit import AuditReport, audit_layer
from bnstats.keras._layers import stored_statistics
from bnstats.keras._pass import KerasPassOptions, measure


def audit(
    model: Any,
    data: Any,
    *,
    mode: Literal["train", "eval"] = "train",
    max_samples: int | None = None,
    progress: bool | None = None,
    batch_size: int | None = None,
    nonfinite: Literal["raise", "skip"] = "skip",
    unreached: Literal["raise", "keep"] = "raise",
    one_batch_bytes: int | None = None,
) -> AuditReport:
    """Compare every BN layer's ``moving_mean``/``moving_variance`` with the population
    statistics of its input over ``data``, measured exactly as
    :func:`bnstats.keras.recalibrate` would write them (same options), writing nothing.

    The report is :func:`bnstats.torch.audit`'s (``worst_first()``, ``to_dict()``,
    ``str(report)``): per layer the shift of the mean in standard deviations, the ratio of
    the variances and the KL divergence, with ``var`` the variance over all N values (what
    Keras stores). Keras keeps no count of updates: ``num_batches_tracked`` is ``None``.
    Layers with ``trainable=False`` (fixed statistics) are listed in ``report.fixed``.
    NaN or Inf batches are left out and flagged (``nonfinite="raise"`` fails instead).
    """
    options = KerasPassOptions(
        mode=mode,
        max_samples=max_samples,
        batch_size=batch_size,
        nonfinite=nonfinite,
        unreached=unreached,
        progress=progress,
        one_batch_bytes=one_batch_bytes,
    )
    result = measure(model, data, options)
    layers = []
    for host in result.measured.reached():
        layer = result.layers[host.name]
        measurement = host.measurement(type(layer).__name__, float(layer.epsilon))
        layers.append(audit_layer(measurement, *stored_statistics(layer)))
    sizes = result.measured.batch_sizes
    return AuditReport(
        layers=layers,
        flags=[],
        batches=len(sizes),
        samples=int(sum(sizes)),
        fixed=list(result.fixed),
        unreached=list(result.measured.unreached),
    )
