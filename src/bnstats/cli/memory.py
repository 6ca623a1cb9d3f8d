"""``bnstats demo`` refuses, before allocating anything, a network that cannot fit in memory
(``--hidden 1000000000``, or labels up to 1e9 making as many output units)."""

from __future__ import annotations

import math
import os

from bnstats.data import Dataset
from bnstats.demo import DemoConfig

BYTES_PER_FLOAT = 8
COPIES_PER_PARAMETER = 4  # the weight, its gradient, Adam's two moments
VECTORS_PER_STEP = 8  # recorded per BN unit and step: batch mu, var, 3 estimators' mean, var
VECTORS_PER_ROW = 8  # activations and the backward's cache, per unit and row


def check_memory(config: DemoConfig, dataset: Dataset) -> None:
    """Raise ``ValueError`` if training and recording the demo's MLP on ``dataset`` needs
    more than this machine's physical memory (not checked where that is unknown)."""
    available = physical_memory()
    needed = bytes_needed(config, dataset)
    if available is None or needed <= available:
        return
    widths = [dataset.features, *config.hidden, dataset.classes]
    steps = _steps(config, dataset)
    if BYTES_PER_FLOAT * VECTORS_PER_STEP * steps * sum(config.hidden) > needed / 2:
        fix = (
            f"the history records every one of its {steps:,} steps: choose fewer --epochs "
            "(or a larger --batch-size)"
        )
    elif dataset.classes > max(config.hidden):
        fix = (
            f"{dataset.name} has labels up to {dataset.classes - 1}, one output unit each: "
            "number the classes 0, 1, 2, ..."
        )
    else:
        fix = "choose smaller --hidden widths"
    raise ValueError(
        f"an MLP {'-'.join(map(str, widths))} needs about {needed / 2**30:,.0f} GiB of memory, "
        f"more than this machine's {available / 2**30:,.0f} GiB; {fix}"
    )


def _steps(config: DemoConfig, dataset: Dataset) -> int:
    return config.epochs * math.ceil(len(dataset.X_train) / config.batch_size)


def bytes_needed(config: DemoConfig, dataset: Dataset) -> int:
    """Parameters (with gradients and Adam's moments), one batch's activations and the
    recorded history, in float64."""
    widths = [dataset.features, *config.hidden, dataset.classes]
    parameters = sum((a + 1) * b for a, b in zip(widths, widths[1:], strict=False))
    rows = max(config.batch_size, len(dataset.X_test))
    steps = _steps(config, dataset)
    floats = (
        COPIES_PER_PARAMETER * parameters
        + VECTORS_PER_ROW * rows * sum(widths)
        + VECTORS_PER_STEP * steps * sum(config.hidden)
    )
    return BYTES_PER_FLOAT * floats


def physical_memory() -> int | None:
    """This machine's RAM in bytes, or None where the system does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None
