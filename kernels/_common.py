"""Helpers shared by the Triton kernels: the interpreter flag, padded head dims, dot precision and the tile dot.

Why the interpreter needs its own path: Triton's CPU interpreter stores bf16 as raw uint16 and its ``tl.dot``
multiplies those integers, so under the interpreter bf16 operands are widened to fp32 first. That is exact (a
bf16 product is exact in fp32) and matches the GPU, whose bf16 MMA also accumulates exactly formed products in
fp32, so the tested numerics are the GPU's.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


def interpreting() -> bool:
    """True when kernels run in Triton's CPU interpreter (``TRITON_INTERPRET`` set to anything but 0/empty);
    read at each launch, so a test can switch it."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("0", "")


def padded_dim(d: int) -> int:
    """A head dim rounded up for tiles: tl.arange needs a power of two and tl.dot a K of at least 16."""
    return max(16, triton.next_power_of_2(d))


def upcast_bf16(dtype: torch.dtype) -> bool:
    """Whether a tile dot of ``dtype`` operands must widen them to fp32 (the interpreter's bf16, see above)."""
    return interpreting() and dtype == torch.bfloat16


@triton.jit
def dot(a, b, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """a @ b in fp32 with ``input_precision=PREC``; UPCAST widens bf16 operands first (interpreter)."""
    if UPCAST:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        out = tl.dot(a, b, input_precision=PREC)
    return out


@triton.jit
def dot_acc(a, b, acc, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a @ b accumulated inside the MMA (not a separate add); otherwise as :func:`dot`."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=PREC)


def valid_span(mask_i8: torch.Tensor | None, L: int) -> torch.Tensor | None:
    """[B] int32: each sequence's last valid position + 1 (0 for an all-padding row), computed on the device
    (no host sync), for the attention kernels' padded-tile skipping; None without a mask."""
    if mask_i8 is None:
        return None
    positions = torch.arange(1, L + 1, device=mask_i8.device, dtype=torch.int32)
    return (mask_i8.to(torch.int32) * positions).amax(dim=1).to(torch.int32).contiguous()


@triton.jit
def loop_span(SPAN, b, tile_start, L, HAS_MASK: tl.constexpr):
    """How far this program's loop over the other side's tiles runs: to the sequence's last valid token + 1,
    or nowhere when its own tile starts past it (every row or key there is padding, so the skipped tiles would
    add exactly nothing). Work then grows with Σ_b len_b², not B·L²; without a mask, to L."""
    if HAS_MASK:
        span = tl.load(SPAN + b)
        return tl.where(tile_start < span, span, 0)
    return L
