"""Central finite differences, shared by the gradient checks."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


def numeric_gradient(objective: Callable[[], float], x: np.ndarray, h: float = 1e-6) -> np.ndarray:
    """d objective / d x by central differences; ``x`` is changed in place and restored."""
    grad = np.zeros_like(x)
    for index in np.ndindex(x.shape):
        saved = x[index]
        x[index] = saved + h
        plus = objective()
        x[index] = saved - h
        minus = objective()
        x[index] = saved
        grad[index] = (plus - minus) / (2 * h)
    return grad
