"""The few array operations the estimators need, for NumPy arrays and torch tensors alike.

The estimators in :mod:`bnstats.stats` are written with plain arithmetic so that one class
serves both worlds. What plain arithmetic cannot do (widen the dtype, test finiteness,
copy) lives here, and torch is never imported: a tensor is recognised by its type's module,
as einops does with its lazy backends.
"""

from __future__ import annotations

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
    column ``(len, 1)`` on ``like``'s device: per-row weights for a ``(rows, C)`` array."""
    if is_torch(like):
        if is_torch(values):
            return values.to(device=like.device, dtype=like.dtype).reshape(-1, 1)
        return like.new_tensor(list(values)).reshape(-1, 1)
    return np.asarray(values, dtype=like.dtype).reshape(-1, 1)


def concat(parts: list[Array], axis: int = 0) -> Array:
    """``parts`` end to end along ``axis`` (``torch.cat`` for tensors, ``numpy.concatenate``
    else)."""
    if is_torch(parts[0]):
        import torch  # present: parts[0] is a tensor

        return torch.cat(parts, dim=axis)
    return np.concatenate(parts, axis=axis)


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
