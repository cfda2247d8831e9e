"""Fused projected hidden-state MSE (TinyBERT's hidden/embedding loss), K layer pairs in one launch.

loss = (1/K) Σ_k Σ_{valid n} Σ_e R²_kne / (n_valid · d_t),   R_k = H_s,k·W_kᵀ + b_k − H_t,k,

the semantics of :func:`fastkd.losses.reference.hidden_mse`, with h [B, L, d] or [K, B, L, d], weight [d_t, d_s] or
[K, d_t, d_s] (nn.Linear's layout), bias [d_t] or [K, d_t]; weight and bias may be None (then d_s == d_t).

The forward is one fused launch, grid (K, N tiles, d_t tiles) (N = B·L): each program computes its R tile
(H_s tile · W tileᵀ over d_s chunks, + b − H_t) in fp32, squares it and writes one fp32 partial sum (summed by
torch: deterministic, no atomics). When a grad is wanted it also stores R in the dot dtype ([K, N, d_t], 0 on
masked rows), and the backward is cuBLAS on it: dH_s = c·R·W, dW = c·Rᵀ·H_s, db = c·Σ_n R, with
c = 2·grad / (K · n_valid · d_t) on the device (no host sync).

Why R is stored and not recomputed: recomputing it in the backward (this file's first version) costs d_s/128
extra projections in each of the dH and dW kernels, so 1 + 2·⌈d_s/128⌉ + 2 GEMMs a step instead of 3 (9 instead
of 3 at d_s = 312 or 384): at B·L = 16384, d_s = 312, d_t = 768 that is 47 GFLOP more per layer pair, ~48 µs on
an H100's ~990 TFLOP/s, against 3·2·N·d_t bytes = 75 MB of traffic for writing R in bf16 and reading it twice,
~22 µs at 3.35 TB/s (bench/kernel_report.py's roofline). The numerics are the same: the recomputing backward
rounded R to the dot dtype for its tensor-core products too. The price is holding R between the passes:
K·N·d_t elements of the dot dtype (126 MB for K = 5, N = 16384, d_t = 768 in bf16); the eager reference under
autocast holds the fp32 projection for its backward, twice that.

Precision: each tile is converted in registers to the dot dtype (the wider of h_s and weight; fp32 for fp64),
so mixed inputs (bf16 activations with an fp32 projection, as under autocast) are never copied. fp32 dots use
input_precision="ieee" (TF32 would add ~1e-3 relative error to the projection, which the subtraction of H_t
amplifies when the student fits well). R is stored in the dot dtype; with fp16 inputs |R| must stay below 65504.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from fastkd.kernels import saving
from fastkd.kernels._common import Tunable, config_space, dot_acc, interpreting, upcast_bf16

__all__ = ["hidden_mse", "HiddenMSEFunction"]

_TL_DTYPE = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


@triton.jit
def _row_offsets(rows, N, L, s_b, s_l, m_ptr, s_mb, s_ml, HAS_MASK: tl.constexpr):
    """Flattened row index n = b·L + l -> (memory offset of row n in a [B, L, ·] tensor, row is valid)."""
    in_range = rows < N
    b = rows // L
    l = rows % L
    ok = in_range
    if HAS_MASK:
        m = tl.load(m_ptr + b * s_mb + l * s_ml, mask=in_range, other=0)
        ok = ok & (m != 0)
    return b * s_b + l * s_l, ok


@triton.jit
def _residual_tile(
    hs_ptr, ht_ptr, w_ptr, bias_ptr,
    hs_rows, ht_rows, ok, cols_t, t_ok,
    s_hs_d, s_ht_d, s_w_t, s_w_s, s_bias,
    DS, BLOCK_M: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_DTYPE: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    """R = H_s·Wᵀ + b − H_t for one [BLOCK_M, BLOCK_T] tile, fp32, exactly 0 on invalid rows/columns."""
    if HAS_WEIGHT:
        acc = tl.zeros((BLOCK_M, BLOCK_T), dtype=tl.float32)
        for k0 in range(0, DS, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < DS
            h = tl.load(hs_ptr + hs_rows[:, None] + ks[None, :] * s_hs_d, mask=ok[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(w_ptr + cols_t[:, None] * s_w_t + ks[None, :] * s_w_s,
                        mask=t_ok[:, None] & k_ok[None, :], other=0.0)
            acc = dot_acc(h.to(DOT_DTYPE), tl.trans(w.to(DOT_DTYPE)), acc, PREC, UPCAST)
    else:  # identity projection: d_s == d_t
        acc = tl.load(hs_ptr + hs_rows[:, None] + cols_t[None, :] * s_hs_d,
                      mask=ok[:, None] & t_ok[None, :], other=0.0).to(tl.float32)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols_t * s_bias, mask=t_ok, other=0.0).to(tl.float32)[None, :]
    valid = ok[:, None] & t_ok[None, :]
    acc -= tl.load(ht_ptr + ht_rows[:, None] + cols_t[None, :] * s_ht_d, mask=valid, other=0.0).to(tl.float32)
    return tl.where(valid, acc, 0.0)


@triton.jit
def _hidden_mse_fwd_kernel(
    hs_ptr, ht_ptr, w_ptr, bias_ptr, m_ptr, out_ptr, r_ptr,
    N, L, DS, DT,
    s_hs_k, s_hs_b, s_hs_l, s_hs_d,
    s_ht_k, s_ht_b, s_ht_l, s_ht_d,
    s_w_k, s_w_t, s_w_s, s_bias_k, s_bias,
    s_mb, s_ml,
    BLOCK_M: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr, STORE_R: tl.constexpr,
):
    k = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_t = tl.program_id(2)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    hs_rows, ok = _row_offsets(rows, N, L, s_hs_b, s_hs_l, m_ptr, s_mb, s_ml, HAS_MASK)
    ht_rows = (rows // L) * s_ht_b + (rows % L) * s_ht_l
    cols_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    r = _residual_tile(
        hs_ptr + k * s_hs_k, ht_ptr + k * s_ht_k, w_ptr + k * s_w_k, bias_ptr + k * s_bias_k,
        hs_rows, ht_rows, ok, cols_t, cols_t < DT, s_hs_d, s_ht_d, s_w_t, s_w_s, s_bias,
        DS, BLOCK_M, BLOCK_T, BLOCK_K, HAS_WEIGHT, HAS_BIAS, DOT_DTYPE, PREC, UPCAST,
    )
    part = tl.sum(tl.sum(r * r, axis=1), axis=0)
    tl.store(out_ptr + (k * tl.num_programs(1) + pid_m) * tl.num_programs(2) + pid_t, part)
    if STORE_R:  # R for the backward, [K, N, DT] in the dot dtype: exactly 0 on masked rows
        offs = (k * N + rows.to(tl.int64))[:, None] * DT + cols_t[None, :]
        tl.store(r_ptr + offs, r.to(DOT_DTYPE), mask=(rows < N)[:, None] & (cols_t < DT)[None, :])


# The GPU launch the static report describes (and the autotuning space's first entry).
_GPU_LAUNCH = dict(BLOCK_M=64, BLOCK_T=64, BLOCK_K=64, num_warps=4, num_stages=3)


def _launch() -> dict[str, int]:
    """Tiles, warps and stages: H100-sized on the GPU, small tiles under the interpreter so tests stay fast."""
    if interpreting():
        return {**_GPU_LAUNCH, "BLOCK_M": 16, "BLOCK_T": 16, "BLOCK_K": 16}
    return dict(_GPU_LAUNCH)


# Autotuning (FASTKD_AUTOTUNE=1 on a GPU): from the default tiles up, never smaller (see `partial` below).
_FORWARD = Tunable(_hidden_mse_fwd_kernel, ["N", "DS", "DT", "HAS_WEIGHT", "HAS_MASK"], config_space(
    _GPU_LAUNCH,
    BLOCK_M=(64, 128), BLOCK_T=(64, 128), num_warps=(4, 8), num_stages=(2, 3, 4)), reset_to_zero=["out_ptr"])


class HiddenMSEFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h_s, h_t, weight, bias, mask, store_r):
        layered = h_s.dim() == 4
        hs = h_s if layered else h_s.unsqueeze(0)
        ht = h_t if layered else h_t.unsqueeze(0)
        w = weight if weight is None or layered else weight.unsqueeze(0)
        bb = bias if bias is None or layered else bias.unsqueeze(0)
        K, B, L, DS = hs.shape
        DT = ht.shape[-1]
        N = B * L
        dev = hs.device
        dot_dtype = hs.dtype if w is None else torch.promote_types(hs.dtype, w.dtype)
        if dot_dtype == torch.float64:  # fp32 accumulation throughout; float64 tiles are read as fp32
            dot_dtype = torch.float32
        has_mask = mask is not None
        m = mask.to(torch.int8) if has_mask else torch.ones(1, 1, dtype=torch.int8, device=dev)
        dummy = torch.zeros(1, dtype=torch.float32, device=dev)
        w_arg = w if w is not None else dummy
        b_arg = bb if bb is not None else dummy
        meta = _launch()
        flags = dict(HAS_WEIGHT=w is not None, HAS_BIAS=bb is not None, HAS_MASK=has_mask,
                     DOT_DTYPE=_TL_DTYPE[dot_dtype], UPCAST=upcast_bf16(dot_dtype),
                     # fp32 tiles: exact fp32 products; half tiles: the MMA's default ("tf32" is ignored for them)
                     PREC="ieee" if dot_dtype == torch.float32 else "tf32")
        w_strides = tuple(w.stride()) if w is not None else (0, 0, 0)
        b_strides = tuple(bb.stride()) if bb is not None else (0, 0)
        common = (N, L, DS, DT, *hs.stride(), *ht.stride(), *w_strides, *b_strides, *m.stride())
        num_m, num_t = triton.cdiv(N, meta["BLOCK_M"]), triton.cdiv(DT, meta["BLOCK_T"])
        # Sized for the smallest tiles any config uses and zeroed (the autotuner re-zeroes it before each trial),
        # so a tuned launch with larger tiles (fewer programs) leaves the rest at 0 and the sum is unchanged.
        partial = torch.zeros(K, num_m, num_t, dtype=torch.float32, device=dev)
        r = torch.empty((K, N, DT) if store_r else (1,), dtype=dot_dtype, device=dev)
        _FORWARD(
            lambda meta: (K, triton.cdiv(N, meta["BLOCK_M"]), triton.cdiv(DT, meta["BLOCK_T"])),
            (hs, ht, w_arg, b_arg, m, partial, r, *common),
            meta,
            **flags, STORE_R=store_r,
        )
        n_valid = mask.sum(dtype=torch.float32) if has_mask else torch.tensor(float(N), device=dev)
        denom = n_valid * (K * DT)
        out = partial.sum() / denom
        saving.save_for_backward(ctx, hs, w, r if store_r else None, denom)
        ctx.layered = layered
        ctx.in_dtypes = (h_s.dtype, None if weight is None else weight.dtype, None if bias is None else bias.dtype)
        return out.to(torch.float64) if torch.float64 in (h_s.dtype, h_t.dtype) else out

    @staticmethod
    def backward(ctx, grad_out):
        hs, w, r, denom = saving.saved_tensors(ctx)
        K, B, L, DS = hs.shape
        # cuBLAS on the stored R (in the dot dtype, as the tensor-core products need it): dH_s = c·R·W,
        # dW = c·Rᵀ·H_s, db = c·Σ_n R. R is 0 on masked rows, so they get exactly 0 and add nothing.
        coef = 2.0 * grad_out.to(torch.float32) / denom
        need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[2], ctx.needs_input_grad[3]
        dh = dw = db = None
        if need_h:
            rw = r if w is None else torch.matmul(r, w.to(r.dtype))
            dh = (rw * coef).to(ctx.in_dtypes[0]).view(K, B, L, DS)
            dh = dh if ctx.layered else dh[0]
        if need_w:
            rh = torch.matmul(r.transpose(1, 2), hs.reshape(K, B * L, DS).to(r.dtype))
            dw = (rh * coef).to(ctx.in_dtypes[1])
            dw = dw if ctx.layered else dw[0]
        if need_b:
            db = (r.sum(dim=1, dtype=torch.float32) * coef).to(ctx.in_dtypes[2])
            db = db if ctx.layered else db[0]
        return dh, None, dw, db, None, None


def hidden_mse(
    h_s: torch.Tensor,
    h_t: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Fused TinyBERT hidden-state MSE. h_s [B, L, d_s] or [K, B, L, d_s] (any strides), h_t likewise with
    d_t, weight [(K,) d_t, d_s] or None, bias [(K,) d_t] or None, mask [B, L] bool or None.

    Inputs are assumed validated (call :func:`fastkd.losses.hidden_mse` for checked input).
    """
    # Grad mode is read here (inside a Function's forward it is always off): no R is written for eval.
    store_r = torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in (h_s, weight, bias))
    return HiddenMSEFunction.apply(h_s, h_t, weight, bias, mask, store_r)
