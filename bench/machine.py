"""A description of the machine a benchmark ran on, for the results file."""

from __future__ import annotations

import os
import platform
from typing import Any

import torch

__all__ = ["describe", "load_average"]

_THREAD_ENV = ("OMP_", "GOMP_", "KMP_", "MKL_", "OPENBLAS_")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory_gib() -> float | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def load_average() -> list[float]:
    """1, 5 and 15 minute load averages: above the core count, timings are inflated."""
    return [round(x, 2) for x in os.getloadavg()]


def describe() -> dict[str, Any]:
    """CPU model, cores, memory, Python and torch versions, torch's thread count."""
    return {
        "cpu_model": _cpu_model(),
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)),
        "memory_gib": _memory_gib(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads_default": torch.get_num_threads(),
        "torch_blas": "mkl" if torch.backends.mkl.is_available() else "other",
        "load_average_start": load_average(),
        # Threading knobs change the timings (see docs/performance.md): record any that are set.
        "env": {k: v for k, v in os.environ.items() if k.startswith(_THREAD_ENV)},
    }
