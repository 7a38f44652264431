"""What makes two runs' numbers comparable: the software, the device and its threads.

Two runs of one spec, seed and data on one machine give the same digits (CPU training is deterministic
here). On another machine the last digits move: CPU matmul kernels (oneDNN/MKL, chosen per instruction
set) and the thread count decide the order in which floating-point sums are added, and that order
changes the rounding; over hundreds of steps the difference grows to the second or third decimal of a
loss. CUDA devices differ the same way, by kernel and GPU model. So each run records this block beside
its numbers, and results are compared digit for digit only where it is equal.
"""

from __future__ import annotations

import platform
from functools import lru_cache
from typing import Any

import torch


@lru_cache(maxsize=1)
def cpu_name() -> str:
    """The CPU's model string (``/proc/cpuinfo`` on Linux), else what `platform` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def device_name(device: torch.device | str) -> str:
    """``cuda:0 (NVIDIA H100 80GB HBM3)`` or ``cpu (AMD EPYC 7B13)``."""
    device = torch.device(device)
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"{device} ({cpu_name()})"


def moeforge_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("moeforge")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


def environment(device: torch.device | str) -> dict[str, Any]:
    """The block a run records (summary.json's and each search trial's ``environment``)."""
    return {
        "moeforge": moeforge_version(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": device_name(device),
        "threads": torch.get_num_threads(),
    }
