"""What every benchmark figure is printed beside: the machine that made it, and whether it was quiet."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import psutil

# A timing taken while the 1-minute load average is above this is not reported as a timing (2 cores here).
QUIET_LOAD = 1.5


def machine() -> str:
    """The CPU as far as it decides the figures: its model and the kernels torch picked for it. A run is
    bit-identical on one machine; on another, other kernels can change the last digits, which training can grow
    into another best epoch (README.md, "Determinism and interruptions")."""
    import torch

    cpuinfo = Path("/proc/cpuinfo")
    names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
             if line.startswith("model name")] if cpuinfo.exists() else []
    model = names[0] if names else platform.processor() or platform.machine()
    return (f"{model}, torch CPU kernels {torch.backends.cpu.get_cpu_capability()}, {psutil.cpu_count()} CPU cores, "
            "no GPU used")


def load_average() -> float:
    """The 1-minute load average (0 where the system does not report one)."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
