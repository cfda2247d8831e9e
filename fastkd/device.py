"""What machine a measurement ran on, for benchmark and results records; native bf16; host memory release."""

from __future__ import annotations

import ctypes
import platform
import sys
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


def release_freed_host_memory() -> bool:
    """Return the heap memory that freed tensors left behind to the OS (glibc's ``malloc_trim``); True when some
    was returned. Why: glibc raises its mmap threshold after large frees, so a finished stage's activations and
    optimizer state stay in the process's heap, and the run's last phase (the best student and an fp32 teacher
    for the test evaluation) then grew the process past its training peak: 1,651 MiB against a training peak of
    1,563 on SST-2 3x192; with the trim, 392 MiB went back first and the last phase stayed under the training peak
    (bench/results/peak-memory-sst2-192.md). A no-op (False) off glibc Linux."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    trim = getattr(libc, "malloc_trim", None)
    return bool(trim(0)) if trim is not None else False
