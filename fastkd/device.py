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


def native_bf16(device: torch.device) -> bool:
    """Does ``device`` compute bf16 matmuls natively (so autocast to bf16 is faster, not emulated)? CUDA:
    torch.cuda.is_bf16_supported(); a CPU: AVX512-BF16 or AMX (oneDNN's bf16 GEMMs run about twice as fast as
    fp32 there: a 6x384 BERT forward at B=32, L=28 took 97 ms in bf16 against 189 ms in fp32 on a 2-core Zen 4).
    CPUs without them (AVX2 only) emulate bf16, slower than fp32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)
