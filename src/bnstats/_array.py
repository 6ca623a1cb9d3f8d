"""The few array operations the estimators need, for NumPy arrays and torch tensors alike.

The estimators in :mod:`bnstats.stats` are written with plain arithmetic so that one class
serves both worlds. What plain arithmetic cannot do (widen the dtype, test finiteness,
copy) lives here, and torch is never imported: a tensor is recognised by its type's module,
as einops does with its lazy backends.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

Array = Any
"""A NumPy array or a torch tensor (torch stays an optional dependency)."""

_NARROW_TORCH_DTYPES = ("torch.float16", "torch.bfloat16")


def is_torch(x: Array) -> bool:
    """True when ``x`` is a torch tensor, without importing torch."""
    return type(x).__module__.startswith("torch")


def as_array(x: Any) -> Array:
    """``x`` itself if it is a NumPy array or a torch tensor, else ``numpy.asarray(x)`` (lists,
    Python numbers), so that every estimator input has ``.shape`` and arithmetic."""
    if isinstance(x, np.ndarray) or is_torch(x):
        return x
    return np.asarray(x, dtype=np.float64)


def column(values: Any, like: Array) -> Array:
    """``values`` (a sequence of numbers, or a 1-D array of ``like``'s kind) as a float64
    column ``(len, 1)`` on ``like``'s device: per-row weights for a ``(rows, C)`` array. A 2-D
    array (per row and column weights) keeps its shape."""
    if is_torch(like):
        if is_torch(values):
            values = values.to(device=like.device, dtype=like.dtype)
            return values if values.dim() == 2 else values.reshape(-1, 1)
        return like.new_tensor(list(values)).reshape(-1, 1)
    values = np.asarray(values, dtype=like.dtype)
    return values if values.ndim == 2 else values.reshape(-1, 1)


def concat(parts: list[Array], axis: int = 0) -> Array:
    """``parts`` end to end along ``axis`` (``torch.cat`` for tensors, ``numpy.concatenate``
    else)."""
    if is_torch(parts[0]):
        import torch  # present: parts[0] is a tensor

        return torch.cat(parts, dim=axis)
    return np.concatenate(parts, axis=axis)


def clamp_min(x: Array, low: float) -> Array:
    """``x`` with every element below ``low`` raised to ``low``."""
    return x.clamp(min=low) if is_torch(x) else np.maximum(x, low)


def zeros_like(x: Array) -> Array:
    """Zeros of ``x``'s shape, dtype and kind (and device)."""
    return x.new_zeros(x.shape) if is_torch(x) else np.zeros_like(x)


def like(x: Array, other: Array) -> Array:
    """``x`` in ``other``'s dtype (and on its device, for tensors)."""
    return x.to(other) if is_torch(x) else np.asarray(x, dtype=other.dtype)


def largest(x: Array, axis: int | None = None) -> Array:
    """The largest element of ``x`` (along ``axis``; of all as a 0-d value of ``x``'s kind),
    no host read for tensors, with NaN counted as infinite (an infinity stays infinite)."""
    if is_torch(x):
        finite = x.nan_to_num(nan=math.inf, posinf=math.inf)
        return finite.max() if axis is None else finite.amax(dim=axis)
    return np.nan_to_num(x, nan=np.inf, posinf=np.inf).max(axis=axis)


def normal_tail(t: Array) -> Array:
    """``P(|Z| > t)`` for a standard normal ``Z``, elementwise: ``erfc(t / sqrt(2))`` (on the
    device for tensors)."""
    if is_torch(t):
        return (t / math.sqrt(2)).erfc()
    return np.vectorize(math.erfc, otypes=[np.float64])(np.asarray(t) / math.sqrt(2))


def widen(x: Array) -> Array:
    """Return ``x`` in the precision the statistics accumulate in.

    NumPy values become float64 arrays. Torch tensors become float64, except on devices
    without float64 (Apple's MPS), where float32 is used; float16/bfloat16 never survive.
    """
    if is_torch(x):
        if x.device.type == "mps":
            return x.float()
        return x.double()
    return np.asarray(x, dtype=np.float64)


def copy(x: Array) -> Array:
    """An independent copy of ``x`` (``clone`` for tensors)."""
    return x.clone() if is_torch(x) else np.array(x, copy=True)


def where(condition: Any, chosen: Any, otherwise: Any) -> Any:
    """``chosen`` where ``condition`` holds, else ``otherwise``: a Python choice for a Python
    or NumPy scalar condition, ``numpy.where`` for an array one, ``torch.where`` for a tensor
    one (also a traced one, never read on the host)."""
    if is_torch(condition):
        import torch  # present: condition is a tensor

        return torch.where(condition, chosen, otherwise)
    if isinstance(condition, np.ndarray) and condition.ndim:
        return np.where(condition, chosen, otherwise)
    return chosen if condition else otherwise


def all_finite(x: Array) -> bool:
    """True when every element of ``x`` is finite."""
    if is_torch(x):
        return bool(x.isfinite().all())
    return bool(np.isfinite(x).all())


def to_numpy(x: Array) -> np.ndarray:
    """A float64 NumPy copy of ``x``, for state dicts and reports."""
    if is_torch(x):
        return x.detach().cpu().double().numpy().copy()
    return np.array(x, dtype=np.float64, copy=True)
