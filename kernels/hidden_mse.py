"""Fused projected hidden-state MSE (TinyBERT's hidden/embedding loss), K layer pairs in one launch.

loss = (1/K) Σ_k Σ_{valid n} Σ_e R²_kne / (n_valid · d_t),   R_k = H_s,k·W_kᵀ + b_k − H_t,k,

the semantics of :func:`fastkd.reference.hidden_mse`, with h [B, L, d] or [K, B, L, d], weight [d_t, d_s] or
[K, d_t, d_s] (nn.Linear's layout), bias [d_t] or [K, d_t]; weight and bias may be None (then d_s == d_t).

Neither pass writes the projected [N, d_t] tensor or the residual R (N = B·L):

* forward, grid (K, N tiles, d_t tiles): each program computes its R tile (H_s tile · W tileᵀ over d_s
  chunks, + b − H_t), squares it and writes one fp32 partial sum; the partials are summed on the host side
  by torch (deterministic, no atomics).
* dH_s = c·R·W, grid (K, N tiles, d_s tiles): loops over d_t chunks, recomputing each R chunk and
  accumulating R·W; masked rows have R = 0, so their gradient is exactly 0.
* dW = c·Rᵀ·H_s and db = c·Σ_n R, grid (SPLIT·K, d_t tiles, d_s tiles): each program reduces its share of
  the rows (split-N so the grid fills the GPU), writing fp32 partials [SPLIT, K, d_t, d_s] that torch sums
  (deterministic; no atomics).

c = 2·grad / (K · n_valid · d_t) lives on the device, so no host sync. Recomputing R costs about (d_s/BLOCK_S)
extra forward matmuls per backward kernel: the price of never holding the K·N·d_t residual (for K = 5,
B·L = 16384, d_t = 768 that is 250 MB in fp32).

Precision: each tile is converted in registers to the dot dtype (the wider of h_s and weight; fp32 for fp64),
so mixed inputs (bf16 activations with an fp32 projection, as under autocast) are never copied. fp32 dots use
input_precision="ieee" (TF32 would add ~1e-3 relative error to the projection, which the subtraction of H_t
amplifies when the student fits well). In the backward, R (fp32) is rounded to the dot dtype for the
tensor-core products; with fp16 inputs |R| must stay below 65504.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from fastkd.kernels import saving
from fastkd.kernels._common import dot_acc, interpreting, upcast_bf16

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
    hs_ptr, ht_ptr, w_ptr, bias_ptr, m_ptr, out_ptr,
    N, L, DS, DT,
    s_hs_k, s_hs_b, s_hs_l, s_hs_d,
    s_ht_k, s_ht_b, s_ht_l, s_ht_d,
    s_w_k, s_w_t, s_w_s, s_bias_k, s_bias,
    s_mb, s_ml,
    BLOCK_M: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
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


@triton.jit
def _hidden_mse_dh_kernel(
    hs_ptr, ht_ptr, w_ptr, bias_ptr, m_ptr, coef_ptr, dh_ptr,
    N, L, DS, DT,
    s_hs_k, s_hs_b, s_hs_l, s_hs_d,
    s_ht_k, s_ht_b, s_ht_l, s_ht_d,
    s_w_k, s_w_t, s_w_s, s_bias_k, s_bias,
    s_mb, s_ml,
    s_dh_k, s_dh_b, s_dh_l, s_dh_d,
    BLOCK_M: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_S: tl.constexpr,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    """dH_s tile [BLOCK_M, BLOCK_S] = c·Σ_t R[:, t]·W[t, s-tile], R recomputed chunk by chunk."""
    k = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_s = tl.program_id(2)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    hs_rows, ok = _row_offsets(rows, N, L, s_hs_b, s_hs_l, m_ptr, s_mb, s_ml, HAS_MASK)
    ht_rows = (rows // L) * s_ht_b + (rows % L) * s_ht_l
    cols_s = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    s_ok = cols_s < DS
    hs_ptr += k * s_hs_k
    ht_ptr += k * s_ht_k
    w_ptr += k * s_w_k
    bias_ptr += k * s_bias_k
    if HAS_WEIGHT:
        acc = tl.zeros((BLOCK_M, BLOCK_S), dtype=tl.float32)
        for t0 in range(0, DT, BLOCK_T):
            cols_t = t0 + tl.arange(0, BLOCK_T)
            t_ok = cols_t < DT
            r = _residual_tile(
                hs_ptr, ht_ptr, w_ptr, bias_ptr, hs_rows, ht_rows, ok, cols_t, t_ok,
                s_hs_d, s_ht_d, s_w_t, s_w_s, s_bias,
                DS, BLOCK_M, BLOCK_T, BLOCK_K, HAS_WEIGHT, HAS_BIAS, DOT_DTYPE, PREC, UPCAST,
            )
            w = tl.load(w_ptr + cols_t[:, None] * s_w_t + cols_s[None, :] * s_w_s,
                        mask=t_ok[:, None] & s_ok[None, :], other=0.0)
            acc = dot_acc(r.to(DOT_DTYPE), w.to(DOT_DTYPE), acc, PREC, UPCAST)
    else:  # d_s == d_t: the gradient is R itself
        acc = _residual_tile(
            hs_ptr, ht_ptr, w_ptr, bias_ptr, hs_rows, ht_rows, ok, cols_s, s_ok,
            s_hs_d, s_ht_d, s_w_t, s_w_s, s_bias,
            DS, BLOCK_M, BLOCK_S, BLOCK_K, HAS_WEIGHT, HAS_BIAS, DOT_DTYPE, PREC, UPCAST,
        )
    acc = acc * tl.load(coef_ptr)
    dh_rows = (rows // L) * s_dh_b + (rows % L) * s_dh_l
    tl.store(dh_ptr + k * s_dh_k + dh_rows[:, None] + cols_s[None, :] * s_dh_d, acc.to(dh_ptr.dtype.element_ty),
             mask=(rows < N)[:, None] & s_ok[None, :])


@triton.jit
def _hidden_mse_dw_kernel(
    hs_ptr, ht_ptr, w_ptr, bias_ptr, m_ptr, dw_ptr, db_ptr,
    N, L, DS, DT, rows_per_split, K,
    s_hs_k, s_hs_b, s_hs_l, s_hs_d,
    s_ht_k, s_ht_b, s_ht_l, s_ht_d,
    s_w_k, s_w_t, s_w_s, s_bias_k, s_bias,
    s_mb, s_ml,
    BLOCK_M: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_S: tl.constexpr,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    """Partial Rᵀ·H_s [BLOCK_T, BLOCK_S] and Σ R [BLOCK_T] over one split of the rows (unscaled, fp32)."""
    pid_ks = tl.program_id(0)  # (split, layer) folded into one axis: grids have at most three
    k = pid_ks % K
    split = pid_ks // K
    pid_t = tl.program_id(1)
    pid_s = tl.program_id(2)
    cols_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = cols_t < DT
    cols_s = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    s_ok = cols_s < DS
    hs_ptr += k * s_hs_k
    ht_ptr += k * s_ht_k
    w_ptr += k * s_w_k
    bias_ptr += k * s_bias_k
    acc_w = tl.zeros((BLOCK_T, BLOCK_S), dtype=tl.float32)
    acc_b = tl.zeros((BLOCK_T,), dtype=tl.float32)
    start = split * rows_per_split
    for m0 in range(start, start + rows_per_split, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        hs_rows, ok = _row_offsets(rows, N, L, s_hs_b, s_hs_l, m_ptr, s_mb, s_ml, HAS_MASK)
        ht_rows = (rows // L) * s_ht_b + (rows % L) * s_ht_l
        r = _residual_tile(
            hs_ptr, ht_ptr, w_ptr, bias_ptr, hs_rows, ht_rows, ok, cols_t, t_ok,
            s_hs_d, s_ht_d, s_w_t, s_w_s, s_bias,
            DS, BLOCK_M, BLOCK_T, BLOCK_K, HAS_WEIGHT, HAS_BIAS, DOT_DTYPE, PREC, UPCAST,
        )
        if HAS_WEIGHT:
            h = tl.load(hs_ptr + hs_rows[:, None] + cols_s[None, :] * s_hs_d,
                        mask=ok[:, None] & s_ok[None, :], other=0.0)
            acc_w = dot_acc(tl.trans(r.to(DOT_DTYPE)), h.to(DOT_DTYPE), acc_w, PREC, UPCAST)
        if HAS_BIAS:
            acc_b += tl.sum(r, axis=0)
    if HAS_WEIGHT:
        base = (split * K + k) * DT * DS
        tl.store(dw_ptr + base + cols_t[:, None] * DS + cols_s[None, :], acc_w, mask=t_ok[:, None] & s_ok[None, :])
    if HAS_BIAS:
        if pid_s == 0:
            tl.store(db_ptr + (split * K + k) * DT + cols_t, acc_b, mask=t_ok)


def _blocks() -> dict[str, int]:
    """Tile sizes: H100-sized on the GPU, small under the interpreter so tests stay fast."""
    if interpreting():
        return dict(BLOCK_M=16, BLOCK_T=16, BLOCK_K=16, BLOCK_S=16)
    return dict(BLOCK_M=64, BLOCK_T=64, BLOCK_K=64, BLOCK_S=128)


def _num_splits(N: int, block_m: int, programs: int, device: torch.device) -> int:
    """Row splits for the dW reduction: enough programs to fill the GPU twice, at least one row tile each."""
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(triton.cdiv(N, block_m), triton.cdiv(2 * sms, programs)))


class HiddenMSEFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h_s, h_t, weight, bias, mask):
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
        blk = _blocks()
        flags = dict(HAS_WEIGHT=w is not None, HAS_BIAS=bb is not None, HAS_MASK=has_mask,
                     DOT_DTYPE=_TL_DTYPE[dot_dtype], UPCAST=upcast_bf16(dot_dtype),
                     # fp32 tiles: exact fp32 products; half tiles: the MMA's default ("tf32" is ignored for them)
                     PREC="ieee" if dot_dtype == torch.float32 else "tf32")
        w_strides = tuple(w.stride()) if w is not None else (0, 0, 0)
        b_strides = tuple(bb.stride()) if bb is not None else (0, 0)
        common = (N, L, DS, DT, *hs.stride(), *ht.stride(), *w_strides, *b_strides, *m.stride())
        num_m, num_t = triton.cdiv(N, blk["BLOCK_M"]), triton.cdiv(DT, blk["BLOCK_T"])
        partial = torch.empty(K, num_m, num_t, dtype=torch.float32, device=dev)
        _hidden_mse_fwd_kernel[(K, num_m, num_t)](
            hs, ht, w_arg, b_arg, m, partial, *common,
            BLOCK_M=blk["BLOCK_M"], BLOCK_T=blk["BLOCK_T"], BLOCK_K=blk["BLOCK_K"], **flags,
        )
        n_valid = mask.sum(dtype=torch.float32) if has_mask else torch.tensor(float(N), device=dev)
        denom = n_valid * (K * DT)
        out = partial.sum() / denom
        saving.save_for_backward(ctx, hs, ht, w, bb, m, denom)
        ctx.meta = (layered, common, flags, blk)
        ctx.in_dtypes = (h_s.dtype, None if weight is None else weight.dtype, None if bias is None else bias.dtype)
        return out.to(torch.float64) if torch.float64 in (h_s.dtype, h_t.dtype) else out

    @staticmethod
    def backward(ctx, grad_out):
        hs, ht, w, bb, m, denom = saving.saved_tensors(ctx)
        layered, common, flags, blk = ctx.meta
        K, B, L, DS = hs.shape
        DT = ht.shape[-1]
        N = B * L
        dev = hs.device
        coef = (2.0 * grad_out.to(torch.float32) / denom).reshape(1).contiguous()
        dummy = torch.zeros(1, dtype=torch.float32, device=dev)
        w_arg = w if w is not None else dummy
        b_arg = bb if bb is not None else dummy
        need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[2], ctx.needs_input_grad[3]
        dh = dw = db = None
        if need_h:
            dh4 = torch.empty(hs.shape, dtype=ctx.in_dtypes[0], device=dev)
            grid = (K, triton.cdiv(N, blk["BLOCK_M"]), triton.cdiv(DS, blk["BLOCK_S"]))
            _hidden_mse_dh_kernel[grid](
                hs, ht, w_arg, b_arg, m, coef, dh4, *common, *dh4.stride(), **blk, **flags,
            )
            dh = dh4 if layered else dh4[0]
        if need_w or need_b:
            num_t = triton.cdiv(DT, blk["BLOCK_T"])
            num_s = triton.cdiv(DS, blk["BLOCK_S"]) if w is not None else 1
            splits = _num_splits(N, blk["BLOCK_M"], K * num_t * num_s, dev)
            rows_per_split = triton.cdiv(triton.cdiv(N, splits), blk["BLOCK_M"]) * blk["BLOCK_M"]
            dw_part = torch.empty(splits, K, DT, DS, dtype=torch.float32, device=dev) if w is not None else dummy
            db_part = torch.empty(splits, K, DT, dtype=torch.float32, device=dev) if bb is not None else dummy
            (n_, l_, ds_, dt_, *strides) = common
            _hidden_mse_dw_kernel[(splits * K, num_t, num_s)](
                hs, ht, w_arg, b_arg, m, dw_part, db_part, n_, l_, ds_, dt_, rows_per_split, K, *strides,
                **blk, **flags,
            )
            if need_w:
                dw = (dw_part.sum(0) * coef).to(ctx.in_dtypes[1])
                dw = dw if layered else dw[0]
            if need_b:
                db = (db_part.sum(0) * coef).to(ctx.in_dtypes[2])
                db = db if layered else db[0]
        return dh, None, dw, db, None


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
    return HiddenMSEFunction.apply(h_s, h_t, weight, bias, mask)
