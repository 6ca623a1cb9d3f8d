"""Where the comparisons run and in what precision: the device check, dtypes by name and
the autocast context of a training step."""

from __future__ import annotations

import contextlib
from contextlib import AbstractContextManager

import torch


def device_problem(device: str) -> str | None:
    """Why ``device`` (``cpu``, ``cuda`` or ``cuda:N``) cannot run the benchmarks, in one
    line, or None if it can."""
    if device == "cpu":
        return None
    if not torch.cuda.is_available():
        built = torch.version.cuda or "no CUDA"
        return (
            f"--device {device}: CUDA is not available here (torch {torch.__version__}, built "
            f"with {built}); run on a machine with an NVIDIA GPU, or use --device cpu"
        )
    index = torch.device(device).index
    if index is not None and index >= torch.cuda.device_count():
        return f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) here"
    return None


def select(device: str) -> None:
    """Make ``device`` the current CUDA device (``cuda:1``: device 1), so that what is made
    on "the current device" (streams, events, new tensors without a device) goes there."""
    index = torch.device(device).index
    if device != "cpu" and index is not None:
        torch.cuda.set_device(index)


def dtype_named(name: str) -> torch.dtype:
    """``torch.float16`` for ``"float16"``, and so on; ValueError for anything else."""
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"not a floating-point torch dtype: {name!r}")
    return dtype


def autocast_to(device: str, precision: str) -> AbstractContextManager:
    """``torch.autocast`` to ``precision`` on ``device``'s type; nothing for float32."""
    if precision == "float32":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype_named(precision))


def precision_label(precision: str) -> str:
    """How a training-step row names its precision: ``fp32``, ``bfloat16 autocast``."""
    return "fp32" if precision == "float32" else f"{precision} autocast"
