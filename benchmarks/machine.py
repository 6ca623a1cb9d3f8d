"""What the benchmarks ran on: CPU, cores, GPU, library versions, threads, load average."""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path
from typing import Any


def cpu_model(cpuinfo: str | Path = "/proc/cpuinfo") -> str:
    """The CPU's model name as the kernel reports it (``platform.processor()`` elsewhere)."""
    try:
        for line in Path(cpuinfo).read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def usable_cores() -> int:
    """Cores this process may run on (``nproc``)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def load_average() -> list[float]:
    """The 1, 5 and 15 minute load averages (``os.getloadavg``), rounded."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def blas_threads() -> list[dict[str, Any]]:
    """Thread pools of the BLAS and OpenMP libraries loaded (needs threadpoolctl)."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return []
    return [
        {"library": info.get("internal_api"), "threads": info.get("num_threads")}
        for info in threadpool_info()
    ]


def gpu(device: str) -> dict[str, Any]:
    """The GPU behind ``device`` (name, memory, CUDA and cuDNN versions); empty on the CPU."""
    import torch

    if device == "cpu":
        return {}
    properties = torch.cuda.get_device_properties(torch.device(device))
    return {
        "device": device,
        "gpu": properties.name,
        "gpu_memory_gib": round(properties.total_memory / 2**30, 1),
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
    }


def describe(device: str = "cpu") -> dict[str, Any]:
    """The machine and software the numbers were measured with."""
    import numpy
    import torch

    return {
        "cpu": cpu_model(),
        "cores": usable_cores(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "numpy": numpy.__version__,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "thread_pools": blas_threads(),
        "load_average": load_average(),
        **gpu(device),
    }
