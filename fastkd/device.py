"""What machine a measurement ran on, for benchmark and results records."""

from __future__ import annotations

import platform
from pathlib import Path

import torch


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def device_name() -> str:
    """The CUDA device's name when one is available, else the CPU model."""
    return torch.cuda.get_device_name() if torch.cuda.is_available() else cpu_model()
