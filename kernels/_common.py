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


# ---------------------------------------------------------------- autotuning (opt-in, GPU only)


def autotune_enabled() -> bool:
    """``FASTKD_AUTOTUNE=1`` on a GPU: each kernel benchmarks its small config space once per key (shape and
    dtypes) and keeps the fastest. Off by default, because the tiling then depends on timing, so results are
    bit-reproducible only within one process (and ranks may differ in the last bits); the default launches are
    the static report's choices and are deterministic. Never under the interpreter, which keeps small tiles."""
    return os.environ.get("FASTKD_AUTOTUNE", "0") not in ("0", "") and not interpreting()


def config_space(default: dict, **choices: tuple) -> list[triton.Config]:
    """``default`` (constexprs + num_warps/num_stages, the report's choice) first, then every combination of
    ``choices`` (e.g. BLOCK_M=(64, 128), num_warps=(4, 8), num_stages=(2, 3, 4)), without duplicates."""
    import itertools

    names = list(choices)
    combos = [default] + [{**default, **dict(zip(names, vals, strict=True))}
                          for vals in itertools.product(*(choices[n] for n in names))]
    out, seen = [], set()
    for c in combos:
        key = tuple(sorted(c.items()))
        if key not in seen:
            seen.add(key)
            meta = {k: v for k, v in c.items() if k not in ("num_warps", "num_stages")}
            out.append(triton.Config(meta, num_warps=c["num_warps"], num_stages=c["num_stages"]))
    return out


class Tunable:
    """A kernel launched with fixed meta-parameters by default, or through ``triton.autotune`` over ``space``
    (keyed by ``key`` and the tensors' dtypes) when :func:`autotune_enabled`."""

    def __init__(self, kernel, key: list[str], space: list[triton.Config], reset_to_zero: list[str] | None = None):
        self.kernel, self.space = kernel, space
        self.tuned = triton.autotune(configs=space, key=key, reset_to_zero=reset_to_zero)(kernel)

    def __call__(self, grid, args: tuple, meta: dict, **consts) -> None:
        """grid: meta dict -> launch grid; meta: this launch's constexprs + num_warps/num_stages."""
        if autotune_enabled():
            self.tuned[grid](*args, **consts)
        else:
            self.kernel[grid(meta)](*args, **meta, **consts)
