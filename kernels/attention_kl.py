"""Fused attention-KL: MiniLM's attention-distribution loss without ever materialising an L×L map.

loss = mean over heads and valid query rows i of KL(softmax(S_t[i]) ‖ softmax(S_s[i])), S = q·kᵀ/√d (each side
its own d), padded keys excluded from both softmaxes. Semantics are those of
:func:`fastkd.losses.reference.attention_kl`.

Forward (flash-attention style): one program per (batch·head, query tile) streams the key tiles once, keeping an
online max m and normaliser l for the teacher and the student plus

    acc = Σ_j exp(s_t,j − m_t)·((s_t,j − m_t) − (s_s,j − m_s)),

so that KL_row = acc/l_t − log l_t + log l_s comes out of a single pass. Accumulating the *shifted* difference
(rather than s_t − s_s) keeps the sum small when both score rows are large but nearly equal up to a constant
(KL ≈ 0), where the naive Σ p_t·(s_t − s_s) − lse_t + lse_s cancels catastrophically in fp32. The per-row
log-normalisers (lse_s, lse_t: 2·B·H·L floats) are kept for the backward.

Gradients: ∂loss/∂S_s[i, j] = w·(p_s − p_t)[i, j] for valid rows i (w = upstream grad / (H·#valid rows)). Then
dQ_s = w·(P_s − P_t)·K_s/√d_s has the form of a flash forward's output (P·V with V = K_s), so the forward
produces it too, from the score tiles it already has: two online-rescaled accumulators, Σ_j e_s·k_s and
Σ_j e_t·k_s, normalised by l_s and l_t at the end, kept as one fp32 [B, H, L, d_s] tensor (only when q_s wants a
grad under grad mode) that the backward scales by w/√d_s. The backward is one kernel, dK_s = dSᵀ·Q_s/√d_s
(programs over key tiles, streaming the query tiles): no atomics, so the gradients are deterministic. Per
(query, key) pair a training step computes the score tiles twice (forward, dK) and six exp2 became four. The
teacher gets no grad.

All exponentials are base 2 (scores pre-multiplied by log2 e) because exp2 is the native instruction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from fastkd.kernels import saving
from fastkd.kernels._common import (
    Tunable,
    config_space,
    dot,
    interpreting,
    loop_span,
    padded_dim,
    upcast_bf16,
    valid_span,
)

__all__ = ["AttentionKLConfig", "attention_kl", "default_config"]

LOG2E = 1.4426950408889634


@dataclass(frozen=True)
class AttentionKLConfig:
    """Launch parameters. The forward and the dK backward share the query tile; the forward, which also
    holds dQ's two [block_m, d_s] fp32 accumulators, has its own key tile and warps (None: as the backward)."""

    block_m: int = 64  # query rows per tile
    block_n: int = 64  # keys per tile (dK backward)
    num_warps: int = 4  # dK backward
    num_stages: int = 2
    fwd_block_n: int | None = None
    fwd_num_warps: int | None = None

    def fwd_meta(self) -> dict:
        """The forward's constexpr tiles and launch options."""
        return dict(BLOCK_M=self.block_m, BLOCK_N=self.fwd_block_n or self.block_n,
                    num_warps=self.fwd_num_warps or self.num_warps, num_stages=self.num_stages)

    def bwd_meta(self) -> dict:
        """The dK backward's constexpr tiles and launch options."""
        return dict(BLOCK_M=self.block_m, BLOCK_N=self.block_n, num_warps=self.num_warps,
                    num_stages=self.num_stages)


# The GPU choice for heads up to 64 wide (default_config's): the launches the static report describes.
_BERT_HEADS = AttentionKLConfig(num_warps=4, fwd_block_n=32, fwd_num_warps=4)


def default_config(d_s: int, d_t: int) -> AttentionKLConfig:
    """Small tiles under the interpreter (speed of the CPU tests); on a GPU, tiles chosen from the static sm_90
    report (bench/kernel_report.py), with which autotuning starts.

    dK backward: 64×64 with 4 warps, flash-attention's usual backward tile for head dims ≤ 64 (178 registers,
    2 CTAs/SM, no spills at d = 64); wider heads hold two [64, d] operand tiles per side, so 8 warps.
    Forward: its dQ accumulators spill at 64×64 and 4 warps in bf16 (255 registers, 48 B), and 8 warps leave
    1 CTA/SM; a 64×32 key tile at 4 warps has no spills and 2 CTAs/SM (250 registers at d = 64).
    """
    if interpreting():
        return AttentionKLConfig(block_m=16, block_n=16, num_warps=1, num_stages=1)
    if max(padded_dim(d_s), padded_dim(d_t)) > 64:
        return AttentionKLConfig(num_warps=8, fwd_block_n=32, fwd_num_warps=8)
    return _BERT_HEADS


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs: plain tf32 would put ~1e-3 relative error on every score (±1 on scores of 1e3), so use the
    # 3-pass tf32 split that recovers fp32 accuracy on tensor cores. Half inputs are exact in any mode.
    return "tf32x3" if dtype == torch.float32 else "tf32"


def _strides4(x: torch.Tensor) -> tuple[int, int, int, int]:
    return tuple(x.stride())  # type: ignore[return-value]


# ---------------------------------------------------------------- kernels


@triton.jit
def _round_bf16(x):
    """fp32 -> nearest bf16 value (ties to even), kept in fp32. The interpreter's own fp32->bf16 cast truncates,
    which the GPU's doesn't; emulating the GPU rounding keeps the CPU-tested numerics those of the GPU."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _dot_ds(ds, x, PREC: tl.constexpr, UPCAST: tl.constexpr, SPLIT: tl.constexpr):
    """ds (fp32, in [−1, 1]: score grads, or the forward's unnormalised probabilities) times x (an input
    tile) in x's dtype, accumulated in fp32.

    SPLIT: one half-precision rounding of ds costs extra relative error where the products cancel (Σ_j ds_ij = 0
    in the backward; P_s·K − P_t·K for a nearly converged student in the forward); ds = hi + lo with both parts
    in x's dtype carries twice the mantissa for one extra MMA.
    """
    if UPCAST:  # interpreter, bf16: round like the GPU, multiply in fp32 (exact for bf16 values)
        hi = _round_bf16(ds)
        out = tl.dot(hi, x.to(tl.float32), input_precision="ieee")
        if SPLIT:
            out += tl.dot(_round_bf16(ds - hi), x.to(tl.float32), input_precision="ieee")
    else:
        hi = ds.to(x.dtype)
        out = tl.dot(hi, x, input_precision=PREC)
        if SPLIT:
            out += tl.dot((ds - hi.to(tl.float32)).to(x.dtype), x, input_precision=PREC)
    return out


@triton.jit
def _attention_kl_fwd(
    QS, KS, QT, KT, MASK, SPAN, KL_ROWS, LSE_S, LSE_T, DQ,
    s_qs_b, s_qs_h, s_qs_l, s_qs_d, s_ks_b, s_ks_h, s_ks_l, s_ks_d,
    s_qt_b, s_qt_h, s_qt_l, s_qt_d, s_kt_b, s_kt_h, s_kt_l, s_kt_d, s_mask_b, s_mask_l,
    H, L, D_S, D_T, scale_s, scale_t,  # scales: log2(e)/√d per side
    HAS_MASK: tl.constexpr, DS_P: tl.constexpr, DT_P: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PREC_S: tl.constexpr, PREC_T: tl.constexpr,
    UPCAST_S: tl.constexpr, UPCAST_T: tl.constexpr, SPLIT_DS: tl.constexpr,
    WANT_DQ: tl.constexpr, SPLIT_P: tl.constexpr,
):
    n_tiles = tl.cdiv(L, BLOCK_M)
    pid = tl.program_id(0)
    tile = pid % n_tiles
    bh = pid // n_tiles
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_ds = tl.arange(0, DS_P)
    offs_dt = tl.arange(0, DT_P)
    row_in = offs_m < L
    qs = tl.load(QS + b * s_qs_b + h * s_qs_h + offs_m[:, None] * s_qs_l + offs_ds[None, :] * s_qs_d,
                 mask=row_in[:, None] & (offs_ds[None, :] < D_S), other=0.0)
    qt = tl.load(QT + b * s_qt_b + h * s_qt_h + offs_m[:, None] * s_qt_l + offs_dt[None, :] * s_qt_d,
                 mask=row_in[:, None] & (offs_dt[None, :] < D_T), other=0.0)
    ks_base = KS + b * s_ks_b + h * s_ks_h
    kt_base = KT + b * s_kt_b + h * s_kt_h

    # Running maxima start finite (not −inf) so that exp2(m_old − m_new) is 0 or 1, never NaN, while a row has
    # seen only padded keys (scores −inf); −1e30 is far below any real score.
    m_s = tl.full([BLOCK_M], -1.0e30, tl.float32)
    m_t = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l_s = tl.zeros([BLOCK_M], tl.float32)
    l_t = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M], tl.float32)
    # dQ's two halves, Σ_j e_s,j·k_s,j and Σ_j e_t,j·k_s,j (teacher weights on the student's keys), rescaled
    # online like a flash forward's output; they are normalised by l_s and l_t only at the end.
    o_s = tl.zeros([BLOCK_M, DS_P], tl.float32)
    o_t = tl.zeros([BLOCK_M, DS_P], tl.float32)
    for start_n in range(0, loop_span(SPAN, b, tile * BLOCK_M, L, HAS_MASK), BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        key_in = offs_n < L
        key_ok = key_in
        if HAS_MASK:
            key_ok = key_ok & (tl.load(MASK + b * s_mask_b + offs_n * s_mask_l, mask=key_in, other=0) != 0)
        # The teacher's K tile is loaded transposed ([d, BLOCK_N]) straight from memory; the student's as
        # [BLOCK_N, d], the layout of dQ's P·K product, and transposed in registers for the score.
        ks = tl.load(ks_base + offs_n[:, None] * s_ks_l + offs_ds[None, :] * s_ks_d,
                     mask=key_in[:, None] & (offs_ds[None, :] < D_S), other=0.0)
        kt_t = tl.load(kt_base + offs_n[None, :] * s_kt_l + offs_dt[:, None] * s_kt_d,
                       mask=key_in[None, :] & (offs_dt[:, None] < D_T), other=0.0)
        ss = dot(qs, tl.trans(ks), PREC_S, UPCAST_S) * scale_s
        st = dot(qt, kt_t, PREC_T, UPCAST_T) * scale_t
        ss = tl.where(key_ok[None, :], ss, float("-inf"))
        st = tl.where(key_ok[None, :], st, float("-inf"))

        m_s_new = tl.maximum(m_s, tl.max(ss, 1))
        m_t_new = tl.maximum(m_t, tl.max(st, 1))
        alpha_s = tl.exp2(m_s - m_s_new)
        alpha_t = tl.exp2(m_t - m_t_new)
        e_s = tl.exp2(ss - m_s_new[:, None])
        e_t = tl.exp2(st - m_t_new[:, None])
        # Select before subtracting: padded keys are −inf on both sides and −inf − −inf would be NaN.
        shifted = (tl.where(key_ok[None, :], st - m_t_new[:, None], 0.0)
                   - tl.where(key_ok[None, :], ss - m_s_new[:, None], 0.0))
        # Re-base the old terms on the new maxima: each old bracket moves by (Δm_s − Δm_t), each weight by alpha_t.
        acc = alpha_t * (acc + ((m_s_new - m_s) - (m_t_new - m_t)) * l_t) + tl.sum(e_t * shifted, 1)
        l_s = l_s * alpha_s + tl.sum(e_s, 1)
        l_t = l_t * alpha_t + tl.sum(e_t, 1)
        if WANT_DQ:
            o_s = o_s * alpha_s[:, None] + _dot_ds(e_s, ks, PREC_S, UPCAST_S, SPLIT_P)
            o_t = o_t * alpha_t[:, None] + _dot_ds(e_t, ks, PREC_S, UPCAST_S, SPLIT_P)
        m_s = m_s_new
        m_t = m_t_new

    row_ok = row_in
    if HAS_MASK:
        row_ok = row_ok & (tl.load(MASK + b * s_mask_b + offs_m * s_mask_l, mask=row_in, other=0) != 0)
    _fwd_store(KL_ROWS, LSE_S, LSE_T, DQ, bh.to(tl.int64) * L + offs_m, offs_ds, row_in, row_ok, D_S,
               acc, m_s, m_t, l_s, l_t, o_s, o_t, WANT_DQ)


@triton.jit
def _fwd_store(KL_ROWS, LSE_S, LSE_T, DQ, out, offs_ds, row_in, row_ok, D_S,
               acc, m_s, m_t, l_s, l_t, o_s, o_t, WANT_DQ: tl.constexpr):
    """The forward's outputs for one row tile: KL per row (nats), both log2-normalisers and, if wanted, dQ."""
    kl = (acc / l_t - tl.log2(l_t) + tl.log2(l_s)) * 0.6931471805599453  # ln 2: back to nats
    kl = tl.where(row_ok, kl, 0.0)  # where, not a product: a padded row's stats may be non-finite
    tl.store(KL_ROWS + out, kl, mask=row_in)
    tl.store(LSE_S + out, m_s + tl.log2(l_s), mask=row_in)
    tl.store(LSE_T + out, m_t + tl.log2(l_t), mask=row_in)
    if WANT_DQ:
        # (P_s − P_t)·K_s for this row tile, before the row weight and 1/√d_s (applied in the backward, which
        # knows the upstream grad). A row with no valid key has l = 0 (and o = 0): it stores 0.
        safe_l_s = tl.where(l_s > 0, l_s, 1.0)
        safe_l_t = tl.where(l_t > 0, l_t, 1.0)
        dq = tl.where(row_ok[:, None], o_s / safe_l_s[:, None] - o_t / safe_l_t[:, None], 0.0)
        tl.store(DQ + out[:, None] * D_S + offs_ds[None, :], dq, mask=row_in[:, None] & (offs_ds[None, :] < D_S))


@triton.jit
def _attention_kl_bwd_dk(
    QS, KS, QT, KT, MASK, SPAN, LSE_S, LSE_T, GRAD_W, DK,
    s_qs_b, s_qs_h, s_qs_l, s_qs_d,
    s_ks_b, s_ks_h, s_ks_l, s_ks_d,
    s_qt_b, s_qt_h, s_qt_l, s_qt_d,
    s_kt_b, s_kt_h, s_kt_l, s_kt_d,
    s_mask_b, s_mask_l,
    s_dk_b, s_dk_h, s_dk_l, s_dk_d,
    H, L, D_S, D_T,
    scale_s, scale_t, grad_scale,
    HAS_MASK: tl.constexpr,
    DS_P: tl.constexpr, DT_P: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PREC_S: tl.constexpr, PREC_T: tl.constexpr,
    UPCAST_S: tl.constexpr, UPCAST_T: tl.constexpr, SPLIT_DS: tl.constexpr,
):
    # One program per (batch·head, key tile); streams the query tiles and works on transposed score tiles
    # Sᵀ = K·Qᵀ ([BLOCK_N, BLOCK_M]) so that dK = dSᵀ·Q needs no transpose of the big tile.
    n_tiles = tl.cdiv(L, BLOCK_N)
    pid = tl.program_id(0)
    tile = pid % n_tiles
    bh = pid // n_tiles
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)

    offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_ds = tl.arange(0, DS_P)
    offs_dt = tl.arange(0, DT_P)
    key_in = offs_n < L
    key_ok = key_in
    if HAS_MASK:
        key_ok = key_ok & (tl.load(MASK + b * s_mask_b + offs_n * s_mask_l, mask=key_in, other=0) != 0)
    ks = tl.load(KS + b * s_ks_b + h * s_ks_h + offs_n[:, None] * s_ks_l + offs_ds[None, :] * s_ks_d,
                 mask=key_in[:, None] & (offs_ds[None, :] < D_S), other=0.0)
    kt = tl.load(KT + b * s_kt_b + h * s_kt_h + offs_n[:, None] * s_kt_l + offs_dt[None, :] * s_kt_d,
                 mask=key_in[:, None] & (offs_dt[None, :] < D_T), other=0.0)
    qs_base = QS + b * s_qs_b + h * s_qs_h
    qt_base = QT + b * s_qt_b + h * s_qt_h
    rows_base = bh.to(tl.int64) * L

    acc = tl.zeros([BLOCK_N, DS_P], tl.float32)
    for start_m in range(0, loop_span(SPAN, b, tile * BLOCK_N, L, HAS_MASK), BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        row_in = offs_m < L
        row_ok = row_in
        if HAS_MASK:
            row_ok = row_ok & (tl.load(MASK + b * s_mask_b + offs_m * s_mask_l, mask=row_in, other=0) != 0)
        qs = tl.load(qs_base + offs_m[:, None] * s_qs_l + offs_ds[None, :] * s_qs_d,
                     mask=row_in[:, None] & (offs_ds[None, :] < D_S), other=0.0)
        qt_t = tl.load(qt_base + offs_m[None, :] * s_qt_l + offs_dt[:, None] * s_qt_d,
                       mask=row_in[None, :] & (offs_dt[:, None] < D_T), other=0.0)
        lse_s = tl.load(LSE_S + rows_base + offs_m, mask=row_in, other=0.0)
        lse_t = tl.load(LSE_T + rows_base + offs_m, mask=row_in, other=0.0)
        ss_t = dot(ks, tl.trans(qs), PREC_S, UPCAST_S) * scale_s
        st_t = dot(kt, qt_t, PREC_T, UPCAST_T) * scale_t
        # Padded keys to −inf before the exponentials (a padded key's score may exceed the row's lse: overflow).
        ss_t = tl.where(key_ok[:, None], ss_t, float("-inf"))
        st_t = tl.where(key_ok[:, None], st_t, float("-inf"))
        valid = key_ok[:, None] & row_ok[None, :]
        ds_t = tl.where(valid, tl.exp2(ss_t - lse_s[None, :]) - tl.exp2(st_t - lse_t[None, :]), 0.0)
        acc += _dot_ds(ds_t, qs, PREC_S, UPCAST_S, SPLIT_DS)

    w = tl.load(GRAD_W) * grad_scale
    dk = acc * w
    if UPCAST_S:
        dk = _round_bf16(dk)
    tl.store(DK + b * s_dk_b + h * s_dk_h + offs_n[:, None] * s_dk_l + offs_ds[None, :] * s_dk_d,
             dk.to(DK.dtype.element_ty), mask=key_in[:, None] & (offs_ds[None, :] < D_S))


# ---------------------------------------------------------------- autotuning (FASTKD_AUTOTUNE=1 on a GPU)

# Each space starts from default_config's choice for BERT heads; keyed by length, head dims and the dtypes.
_KEY = ["L", "D_S", "D_T", "HAS_MASK"]
_FORWARD = Tunable(_attention_kl_fwd, _KEY, config_space(
    _BERT_HEADS.fwd_meta(),
    BLOCK_M=(64, 128), BLOCK_N=(32, 64), num_warps=(4, 8), num_stages=(2, 3)))
_DK_BACKWARD = Tunable(_attention_kl_bwd_dk, _KEY, config_space(
    _BERT_HEADS.bwd_meta(),
    BLOCK_M=(64, 128), BLOCK_N=(64, 128), num_warps=(4, 8), num_stages=(2, 3)))


# ---------------------------------------------------------------- autograd


def _common_args(q_s, k_s, q_t, k_t, mask_arg):
    mask_strides = (0, 0) if mask_arg is None else tuple(mask_arg.stride())
    return (*_strides4(q_s), *_strides4(k_s), *_strides4(q_t), *_strides4(k_t), *mask_strides)


class _AttentionKLFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q_s, k_s, q_t, k_t, mask, config: AttentionKLConfig, want_dq: bool):
        B, H, L, d_s = q_s.shape
        d_t = q_t.shape[-1]
        dev = q_s.device
        # The kernels read the mask as bytes; int8 is [B, L], O(B·L), and keeps the caller's bool untouched.
        mask_i8 = None if mask is None else mask.to(torch.int8)
        span = valid_span(mask_i8, L)
        span = q_s if span is None else span  # any pointer: read only with a mask
        kl_rows = torch.empty(B * H * L, device=dev, dtype=torch.float32)
        lse_s = torch.empty(B * H * L, device=dev, dtype=torch.float32)
        lse_t = torch.empty(B * H * L, device=dev, dtype=torch.float32)
        consts = dict(
            HAS_MASK=mask is not None, DS_P=padded_dim(d_s), DT_P=padded_dim(d_t),
            PREC_S=_dot_precision(q_s.dtype), PREC_T=_dot_precision(q_t.dtype),
            UPCAST_S=upcast_bf16(q_s.dtype),
            UPCAST_T=upcast_bf16(q_t.dtype),
            SPLIT_DS=q_s.dtype == torch.bfloat16,
        )
        scale_s, scale_t = LOG2E / math.sqrt(d_s), LOG2E / math.sqrt(d_t)
        # dQ is a flash forward over the same score tiles, so it comes out of this pass (fp32, unscaled) when
        # the student's Q wants a grad; the backward then recomputes the scores once (dK), not twice.
        dq_partial = torch.empty((B, H, L, d_s) if want_dq else (1,), device=dev, dtype=torch.float32)
        _FORWARD(
            lambda meta: (B * H * triton.cdiv(L, meta["BLOCK_M"]),),
            (q_s, k_s, q_t, k_t, q_s if mask_i8 is None else mask_i8, span, kl_rows, lse_s, lse_t, dq_partial,
             *_common_args(q_s, k_s, q_t, k_t, mask_i8), H, L, d_s, d_t, scale_s, scale_t),
            config.fwd_meta(),
            **consts, WANT_DQ=want_dq, SPLIT_P=q_s.dtype != torch.float32,
        )
        if mask_i8 is None:
            denom = torch.full((), float(H * B * L), device=dev, dtype=torch.float32)
        else:
            denom = mask_i8.sum(dtype=torch.float32) * H  # stays on the device: no host sync
        loss = kl_rows.sum() / denom

        saving.save_for_backward(ctx, q_s, k_s, q_t, k_t, mask_i8, span, lse_s, lse_t, denom,
                                 dq_partial if want_dq else None)
        ctx.config = config
        ctx.consts = consts
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        q_s, k_s, q_t, k_t, mask_i8, span, lse_s, lse_t, denom, dq_partial = saving.saved_tensors(ctx)
        need_q, need_k = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not (need_q or need_k):
            return None, None, None, None, None, None, None
        B, H, L, d_s = q_s.shape
        d_t = q_t.shape[-1]
        config = ctx.config
        # The upstream grad is a tensor (not necessarily 1): fold it with 1/(H·#valid rows) on the device.
        grad_w = (grad_out.to(torch.float32) / denom).reshape(1)
        dq = dk = None
        if need_q:  # one rounding, fp32 -> the student's dtype, as a kernel's store would do
            dq = (dq_partial * (grad_w / math.sqrt(d_s))).to(q_s.dtype)
        if need_k:
            scale_s, scale_t = LOG2E / math.sqrt(d_s), LOG2E / math.sqrt(d_t)
            dk = torch.empty(k_s.shape, device=k_s.device, dtype=k_s.dtype)
            _DK_BACKWARD(
                lambda meta: (B * H * triton.cdiv(L, meta["BLOCK_N"]),),
                (q_s, k_s, q_t, k_t, q_s if mask_i8 is None else mask_i8, span, lse_s, lse_t, grad_w, dk,
                 *_common_args(q_s, k_s, q_t, k_t, mask_i8), *_strides4(dk),
                 H, L, d_s, d_t, scale_s, scale_t, 1.0 / math.sqrt(d_s)),
                config.bwd_meta(),
                **ctx.consts,
            )
        return dq, dk, None, None, None, None, None


# ---------------------------------------------------------------- entry


def attention_kl(
    q_s: torch.Tensor,
    k_s: torch.Tensor,
    q_t: torch.Tensor,
    k_t: torch.Tensor,
    mask: torch.Tensor | None = None,
    config: AttentionKLConfig | None = None,
) -> torch.Tensor:
    """Fused MiniLM attention-KL; inputs as validated by :func:`fastkd.losses.attention_kl`.

    q, k: [B, H, L, d] (any strides: relation_kl's head-split views are read in place), mask: None or bool
    [B, L]. Returns a float32 scalar; gradients flow to q_s and k_s (in their dtypes), never to the teacher,
    whose tensors should be detached. float64 inputs never reach it: fastkd.losses sends them to the float64
    reference, since the kernels accumulate in float32.
    """
    # tl.dot needs both operands in one dtype; mixed q/k dtypes on one side are rare, so promote by copying.
    if k_s.dtype != q_s.dtype:
        dt = torch.promote_types(q_s.dtype, k_s.dtype)
        q_s, k_s = q_s.to(dt), k_s.to(dt)
    if k_t.dtype != q_t.dtype:
        dt = torch.promote_types(q_t.dtype, k_t.dtype)
        q_t, k_t = q_t.to(dt), k_t.to(dt)
    if config is None:
        config = default_config(q_s.shape[-1], q_t.shape[-1])
    # Grad mode is read here: inside a Function's forward it is always off (and needs_input_grad always set).
    want_dq = q_s.requires_grad and torch.is_grad_enabled()
    return _AttentionKLFunction.apply(q_s, k_s, q_t.detach(), k_t.detach(), mask, config, want_dq)
