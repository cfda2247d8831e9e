"""Fused attention-score MSE (TinyBERT's attention loss) without any L×L tensor.

loss = Σ_{b,h} Σ_{valid i,j} (S_s − S_t)²_ij / (H · Σ_b n_b²),  S = Q·Kᵀ/√d (each side its own d),

the semantics of :func:`fastkd.losses.reference.attention_mse`. With padded rows of Q and K zeroed and α = 1/√d_s,
β = 1/√d_t, the Frobenius norm per (b, h) follows from d×d Gram matrices (the Gram identity):

    ‖αQ_sK_sᵀ − βQ_tK_tᵀ‖²_F = α²⟨Q_sᵀQ_s, K_sᵀK_s⟩ + β²⟨Q_tᵀQ_t, K_tᵀK_t⟩ − 2αβ⟨Q_sᵀQ_t, K_sᵀK_t⟩,

so the forward is O(L·d²) instead of O(L²·d) and reads Q, K once. With D = αQ_sK_sᵀ − βQ_tK_tᵀ and
c = 2·grad/(H·Σn²), the backward is also in Gram form (O(L·d²), Q/K read once, nothing L×L):

    dQ_s = c·α·D·K_s  = c·(α²·Q_s·(K_sᵀK_s) − αβ·Q_t·(K_tᵀK_s))
    dK_s = c·α·Dᵀ·Q_s = c·(α²·K_s·(Q_sᵀQ_s) − αβ·K_t·(Q_tᵀQ_s))
    dQ_t = −c·β·D·K_t = c·(β²·Q_t·(K_tᵀK_t) − αβ·Q_s·(K_sᵀK_t))     (only if the teacher needs grads)
    dK_t = −c·β·Dᵀ·Q_t = c·(β²·K_t·(Q_tᵀQ_t) − αβ·K_s·(Q_sᵀQ_t))

with padded rows' gradients set to zero (their pairs are excluded from the loss).

Cancellation, measured and decided: the three Gram terms are each of size ‖S‖² while their sum is the loss, so
the fp32 Gram form's relative error grows like u/ρ with ρ = loss / (‖αQ_sK_sᵀ‖² + ‖βQ_tK_tᵀ‖²). Measured with
fp32 accumulation in 64-row tiles (L = 128…2048, d = 64, student = teacher + ε·noise): ρ = 0.6 → 1e-7,
ρ = 1e-2 → ≤ 1e-5, ρ = 1e-3 → ≤ 1e-4, ρ = 1e-4 → up to 7e-4, ρ = 1e-6 → 5e-2. Decision: the Gram form always
runs (it is what makes long sequences cheap, and real students sit at ρ ≫ 1e-3), and every (b, h) whose ρ is
below ``CANCELLATION_RATIO`` = 1e-3 is recomputed *on device, without a host sync* by a tiled direct kernel that
streams key tiles and accumulates (S_s − S_t)² on the fly (flash-style, O(L²·d) but still nothing L×L in
memory). That kernel is launched every call; its programs for well-conditioned heads exit at once.
The backward's cancellation is first order only (D·K computed as a difference of two terms of size ‖S‖·‖K‖):
measured in fp32 (L = 70, d = 32): 1.3e-6 at ρ ≈ 1e-2, 1.3e-5 at ρ ≈ 1e-4, 1.3e-4 at ρ ≈ 1e-6, so it stays
in Gram form (fp16/bf16 gradients are limited by their own rounding long before that).

Precision: fp16/bf16 tiles go to tl.dot as they are (exact products, fp32 accumulation); fp32 inputs use
input_precision="ieee" (TF32's 10-bit mantissa would be amplified by the cancellation above). The backward
multiplies tiles by fp32 Gram matrices: for fp16/bf16 tiles with 3xTF32 on tensor cores (the tiles are exact in
TF32, so only the Gram's low bits round, ~2^-22: fp32 accuracy), for fp32 tiles with "ieee" FMAs. The "ieee"
form compiled to 255 registers and 880 B of spills a thread (Triton 3.9; 32 registers and 9-18 KB of spills
under 3.6) with no MMA; 3xTF32 compiles to 182-189 registers, no spill, HGMMA (bench/kernel_report.py).
Registers: the forward keeps six d×d fp32 accumulators per program; fine for BERT heads (d ≤ 64), spills
above that (correct, slower).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from fastkd.kernels import saving
from fastkd.kernels._common import (
    Tunable,
    config_space,
    dot_acc,
    interpreting,
    loop_span,
    padded_dim,
    upcast_bf16,
    valid_span,
)

__all__ = ["attention_mse", "AttentionMSEFunction", "CANCELLATION_RATIO"]

# Heads whose loss is below this fraction of ‖S_s‖² + ‖S_t‖² are recomputed by the direct (streaming) kernel.
CANCELLATION_RATIO = 1e-3



@triton.jit
def _load_rows(ptr, stride_l, stride_d, rows, row_ok, D: tl.constexpr, DP: tl.constexpr):
    cols = tl.arange(0, DP)
    offs = rows[:, None] * stride_l + cols[None, :] * stride_d
    return tl.load(ptr + offs, mask=row_ok[:, None] & (cols[None, :] < D), other=0.0)


@triton.jit
def _row_valid(mask_ptr, stride_mb, stride_ml, b, rows, L, HAS_MASK: tl.constexpr):
    ok = rows < L
    if HAS_MASK:
        m = tl.load(mask_ptr + b * stride_mb + rows * stride_ml, mask=ok, other=0)
        ok = ok & (m != 0)
    return ok


@triton.jit
def _store_gram(ptr, g, R: tl.constexpr, C: tl.constexpr):
    r = tl.arange(0, R)
    c = tl.arange(0, C)
    tl.store(ptr + r[:, None] * C + c[None, :], g)


@triton.jit
def _load_gram(ptr, R: tl.constexpr, C: tl.constexpr):
    r = tl.arange(0, R)
    c = tl.arange(0, C)
    return tl.load(ptr + r[:, None] * C + c[None, :])


@triton.jit
def _attention_mse_gram_fwd_kernel(
    qs_ptr, ks_ptr, qt_ptr, kt_ptr, mask_ptr, span_ptr,
    loss_ptr, flag_ptr, gram_ptr,
    H, L,
    s_qs_b, s_qs_h, s_qs_l, s_qs_d,
    s_ks_b, s_ks_h, s_ks_l, s_ks_d,
    s_qt_b, s_qt_h, s_qt_l, s_qt_d,
    s_kt_b, s_kt_h, s_kt_l, s_kt_d,
    s_m_b, s_m_l,
    alpha, beta, ratio,
    DS: tl.constexpr, DT: tl.constexpr, DSP: tl.constexpr, DTP: tl.constexpr,
    BLOCK_L: tl.constexpr, HAS_MASK: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    pid = tl.program_id(0)
    b = pid // H
    h = pid % H
    qs_ptr += b * s_qs_b + h * s_qs_h
    ks_ptr += b * s_ks_b + h * s_ks_h
    qt_ptr += b * s_qt_b + h * s_qt_h
    kt_ptr += b * s_kt_b + h * s_kt_h

    g_qss = tl.zeros((DSP, DSP), dtype=tl.float32)
    g_kss = tl.zeros((DSP, DSP), dtype=tl.float32)
    g_qtt = tl.zeros((DTP, DTP), dtype=tl.float32)
    g_ktt = tl.zeros((DTP, DTP), dtype=tl.float32)
    g_qst = tl.zeros((DSP, DTP), dtype=tl.float32)
    g_kst = tl.zeros((DSP, DTP), dtype=tl.float32)
    for l0 in range(0, loop_span(span_ptr, b, 0, L, HAS_MASK), BLOCK_L):  # rows past the last valid token: none
        rows = l0 + tl.arange(0, BLOCK_L)
        ok = _row_valid(mask_ptr, s_m_b, s_m_l, b, rows, L, HAS_MASK)
        qs = _load_rows(qs_ptr, s_qs_l, s_qs_d, rows, ok, DS, DSP)
        ks = _load_rows(ks_ptr, s_ks_l, s_ks_d, rows, ok, DS, DSP)
        qt = _load_rows(qt_ptr, s_qt_l, s_qt_d, rows, ok, DT, DTP)
        kt = _load_rows(kt_ptr, s_kt_l, s_kt_d, rows, ok, DT, DTP)
        g_qss = dot_acc(tl.trans(qs), qs, g_qss, PRECISION, UPCAST)
        g_kss = dot_acc(tl.trans(ks), ks, g_kss, PRECISION, UPCAST)
        g_qtt = dot_acc(tl.trans(qt), qt, g_qtt, PRECISION, UPCAST)
        g_ktt = dot_acc(tl.trans(kt), kt, g_ktt, PRECISION, UPCAST)
        g_qst = dot_acc(tl.trans(qs), qt, g_qst, PRECISION, UPCAST)
        g_kst = dot_acc(tl.trans(ks), kt, g_kst, PRECISION, UPCAST)

    ss = tl.sum(tl.sum(g_qss * g_kss, axis=1), axis=0) * (alpha * alpha)
    tt = tl.sum(tl.sum(g_qtt * g_ktt, axis=1), axis=0) * (beta * beta)
    st = tl.sum(tl.sum(g_qst * g_kst, axis=1), axis=0) * (alpha * beta)
    loss = ss + tt - 2.0 * st
    tl.store(loss_ptr + pid, loss)
    # Ill-conditioned heads (see the module docstring) get recomputed by the direct kernel. NaN compares False,
    # so a NaN loss stays in the Gram result and propagates.
    tl.store(flag_ptr + pid, (loss < ratio * (ss + tt)).to(tl.int32))

    # Gram matrices for the backward, padded to powers of two: [qss, kss | qtt, ktt | qst, kst].
    base = gram_ptr + pid * (2 * DSP * DSP + 2 * DTP * DTP + 2 * DSP * DTP)
    _store_gram(base, g_qss, DSP, DSP)
    _store_gram(base + DSP * DSP, g_kss, DSP, DSP)
    base += 2 * DSP * DSP
    _store_gram(base, g_qtt, DTP, DTP)
    _store_gram(base + DTP * DTP, g_ktt, DTP, DTP)
    base += 2 * DTP * DTP
    _store_gram(base, g_qst, DSP, DTP)
    _store_gram(base + DSP * DTP, g_kst, DSP, DTP)


@triton.jit
def _attention_mse_direct_fwd_kernel(
    qs_ptr, ks_ptr, qt_ptr, kt_ptr, mask_ptr, span_ptr,
    flag_ptr, out_ptr,
    H, L,
    s_qs_b, s_qs_h, s_qs_l, s_qs_d,
    s_ks_b, s_ks_h, s_ks_l, s_ks_d,
    s_qt_b, s_qt_h, s_qt_l, s_qt_d,
    s_kt_b, s_kt_h, s_kt_l, s_kt_d,
    s_m_b, s_m_l,
    alpha, beta,
    DS: tl.constexpr, DT: tl.constexpr, DSP: tl.constexpr, DTP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_MASK: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """Σ over one query tile of (S_s − S_t)², streaming key tiles; only for heads flagged by the Gram kernel."""
    pid = tl.program_id(0)
    pid_m = tl.program_id(1)
    num_m = tl.num_programs(1)
    flag = tl.load(flag_ptr + pid)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if flag != 0:
        b = pid // H
        h = pid % H
        qs_ptr += b * s_qs_b + h * s_qs_h
        ks_ptr += b * s_ks_b + h * s_ks_h
        qt_ptr += b * s_qt_b + h * s_qt_h
        kt_ptr += b * s_kt_b + h * s_kt_h
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = _row_valid(mask_ptr, s_m_b, s_m_l, b, rows, L, HAS_MASK)
        qs = _load_rows(qs_ptr, s_qs_l, s_qs_d, rows, row_ok, DS, DSP)
        qt = _load_rows(qt_ptr, s_qt_l, s_qt_d, rows, row_ok, DT, DTP)
        for n0 in range(0, loop_span(span_ptr, b, pid_m * BLOCK_M, L, HAS_MASK), BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            col_ok = _row_valid(mask_ptr, s_m_b, s_m_l, b, cols, L, HAS_MASK)
            ks = _load_rows(ks_ptr, s_ks_l, s_ks_d, cols, col_ok, DS, DSP)
            kt = _load_rows(kt_ptr, s_kt_l, s_kt_d, cols, col_ok, DT, DTP)
            s_s = dot_acc(qs, tl.trans(ks), None, PRECISION, UPCAST)
            s_t = dot_acc(qt, tl.trans(kt), None, PRECISION, UPCAST)
            # Padded rows/columns were loaded as zeros, so their score difference is exactly 0.
            diff = s_s * alpha - s_t * beta
            acc += diff * diff
    tl.store(out_ptr + pid * num_m + pid_m, tl.sum(tl.sum(acc, axis=1), axis=0))


@triton.jit
def _attention_mse_gram_bwd_kernel(
    x_ptr, y_ptr, gram_same_ptr, gram_cross_ptr, mask_ptr, span_ptr, coef_ptr, out_ptr,
    H, L,
    s_x_b, s_x_h, s_x_l, s_x_d,
    s_y_b, s_y_h, s_y_l, s_y_d,
    s_m_b, s_m_l,
    s_o_b, s_o_h, s_o_l, s_o_d,
    gram_stride, scale_same, scale_cross,
    DX: tl.constexpr, DY: tl.constexpr, DXP: tl.constexpr, DYP: tl.constexpr,
    CROSS_T: tl.constexpr,
    BLOCK_L: tl.constexpr, HAS_MASK: tl.constexpr, GRAM_PRECISION: tl.constexpr,
):
    """out = coef·(scale_same·X·G_same − scale_cross·Y·G_crossᵀ) for one row tile, padded rows zero.

    X is the tensor whose gradient this is (e.g. Q_s), Y its counterpart on the other model (Q_t); G_same is
    [DXP, DXP] (e.g. K_sᵀK_s), G_cross the stored cross Gram: [DXP, DYP] when CROSS_T (stored as Xside-major,
    e.g. K_sᵀK_t for dQ_s, used transposed), else [DYP, DXP] (e.g. K_sᵀK_t for dQ_t, used as is).
    """
    pid = tl.program_id(0)
    pid_l = tl.program_id(1)
    b = pid // H
    h = pid % H
    rows = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    ok = _row_valid(mask_ptr, s_m_b, s_m_l, b, rows, L, HAS_MASK)
    acc = tl.zeros((BLOCK_L, DXP), dtype=tl.float32)
    if loop_span(span_ptr, b, pid_l * BLOCK_L, L, HAS_MASK) > 0:  # a tile past the last valid token: zeros
        x = _load_rows(x_ptr + b * s_x_b + h * s_x_h, s_x_l, s_x_d, rows, ok, DX, DXP).to(tl.float32)
        y = _load_rows(y_ptr + b * s_y_b + h * s_y_h, s_y_l, s_y_d, rows, ok, DY, DYP).to(tl.float32)
        g_same = _load_gram(gram_same_ptr + pid * gram_stride, DXP, DXP)
        if CROSS_T:
            g_cross = tl.trans(_load_gram(gram_cross_ptr + pid * gram_stride, DXP, DYP))
        else:
            g_cross = _load_gram(gram_cross_ptr + pid * gram_stride, DYP, DXP)
        acc = tl.dot(x, g_same, input_precision=GRAM_PRECISION) * scale_same
        acc -= tl.dot(y, g_cross, input_precision=GRAM_PRECISION) * scale_cross
        acc = tl.where(ok[:, None], acc * tl.load(coef_ptr), 0.0)
    cols = tl.arange(0, DXP)
    offs = rows[:, None] * s_o_l + cols[None, :] * s_o_d
    tl.store(out_ptr + b * s_o_b + h * s_o_h + offs, acc.to(out_ptr.dtype.element_ty),
             mask=(rows[:, None] < L) & (cols[None, :] < DX))


_GPU_TILE = 64  # the Gram row tile and the direct kernel's tiles on a GPU (the report's; autotuning starts there)


def _block_sizes(L: int) -> tuple[int, int, int]:
    """(Gram tile, direct query tile, direct key tile). Small under the interpreter so tests stay fast."""
    if interpreting():
        return 16, 16, 16
    return _GPU_TILE, _GPU_TILE, _GPU_TILE


def _gram_fwd_launch(widths: int) -> dict:
    """Warps of the Gram forward: 8 for BERT heads (64 + 64), whose six 64×64 fp32 accumulators take 138-144
    registers a thread, so one CTA per SM (see LOW_OCCUPANCY_REASONS in bench/kernel_report.py: capped at 128
    registers it spills under Triton 3.6, the GPU image's)."""
    return {"num_warps": 8 if widths > 64 else 4}


_GRAM_BWD_LAUNCH = dict(num_warps=4, num_stages=3)


def gram_precision(dtype: torch.dtype) -> str:
    """The backward's tile × fp32-Gram dots: 3xTF32 on tensor cores for fp16/bf16 tiles, whose values TF32
    holds exactly (so only the Gram's low bits are rounded, ~2^-22 relative: fp32 accuracy), else IEEE fp32
    FMAs (an fp32 tile is not exact in TF32)."""
    return "ieee" if dtype in (torch.float32, torch.float64) else "tf32x3"


def _precision(*xs: torch.Tensor) -> str:
    return "ieee" if any(x.dtype in (torch.float32, torch.float64) for x in xs) else "tf32"


# Autotuning (FASTKD_AUTOTUNE=1 on a GPU): spaces start from the defaults above. The direct kernel is not tuned:
# its per-tile output buffer is sized by its query tile, and it does work only for ill-conditioned heads.
_KEY = ["L", "DS", "DT", "HAS_MASK"]
_GRAM_FORWARD = Tunable(_attention_mse_gram_fwd_kernel, _KEY, config_space(
    dict(BLOCK_L=_GPU_TILE, num_stages=3, **_gram_fwd_launch(64 + 64)),  # BERT heads on both sides
    BLOCK_L=(64, 128), num_warps=(4, 8), num_stages=(2, 3, 4)))
_GRAM_BACKWARD = Tunable(_attention_mse_gram_bwd_kernel, ["L", "DX", "DY", "HAS_MASK"], config_space(
    dict(BLOCK_L=_GPU_TILE, **_GRAM_BWD_LAUNCH), BLOCK_L=(64, 128), num_warps=(4, 8), num_stages=(2, 3, 4)))


class AttentionMSEFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q_s, k_s, q_t, k_t, mask):
        B, H, L, DS = q_s.shape
        DT = q_t.shape[-1]
        DSP, DTP = padded_dim(DS), padded_dim(DT)
        dev = q_s.device
        # tl.dot wants both operands in one dtype; mixed student/teacher dtypes meet in the wider one.
        common = torch.promote_types(q_s.dtype, q_t.dtype)
        if common == torch.float64:  # the kernels accumulate in fp32; float64 inputs are computed in fp32
            common = torch.float32
        q_s_, k_s_, q_t_, k_t_ = (x if x.dtype == common else x.to(common) for x in (q_s, k_s, q_t, k_t))
        has_mask = mask is not None
        mask_i8 = mask.to(torch.int8) if has_mask else torch.ones(1, 1, dtype=torch.int8, device=dev)
        span = valid_span(mask_i8, L) if has_mask else mask_i8  # any pointer: read only with a mask
        alpha, beta = 1.0 / math.sqrt(DS), 1.0 / math.sqrt(DT)
        BH = B * H
        gram_stride = 2 * DSP * DSP + 2 * DTP * DTP + 2 * DSP * DTP
        loss_bh = torch.empty(BH, dtype=torch.float32, device=dev)
        flag = torch.empty(BH, dtype=torch.int32, device=dev)
        grams = torch.empty(BH, gram_stride, dtype=torch.float32, device=dev)
        block_l, block_m, block_n = _block_sizes(L)
        prec = _precision(q_s_)
        upcast = upcast_bf16(common)
        strides = (*q_s_.stride(), *k_s_.stride(), *q_t_.stride(), *k_t_.stride(), *mask_i8.stride())
        _GRAM_FORWARD(
            lambda meta: (BH,),
            (q_s_, k_s_, q_t_, k_t_, mask_i8, span, loss_bh, flag, grams, H, L, *strides,
             alpha, beta, CANCELLATION_RATIO),
            dict(BLOCK_L=block_l, num_stages=3, **_gram_fwd_launch(DSP + DTP)),
            DS=DS, DT=DT, DSP=DSP, DTP=DTP, HAS_MASK=has_mask, PRECISION=prec, UPCAST=upcast,
        )
        num_m = triton.cdiv(L, block_m)
        direct = torch.empty(BH, num_m, dtype=torch.float32, device=dev)
        _attention_mse_direct_fwd_kernel[(BH, num_m)](
            q_s_, k_s_, q_t_, k_t_, mask_i8, span, flag, direct, H, L, *strides, alpha, beta,
            DS=DS, DT=DT, DSP=DSP, DTP=DTP, BLOCK_M=block_m, BLOCK_N=block_n, HAS_MASK=has_mask,
            PRECISION=prec, UPCAST=upcast, num_warps=4,
        )
        per_head = torch.where(flag != 0, direct.sum(dim=1), loss_bh)
        if has_mask:
            pairs = mask.sum(dim=1, dtype=torch.float32).square().sum() * H
        else:
            pairs = torch.tensor(float(B * H * L * L), dtype=torch.float32, device=dev)
        out = per_head.sum() / pairs
        saving.save_for_backward(ctx, q_s_, k_s_, q_t_, k_t_, mask_i8, span, grams, pairs)
        ctx.has_mask = has_mask
        ctx.dims = (DS, DT, DSP, DTP, block_l)
        ctx.in_dtypes = (q_s.dtype, k_s.dtype, q_t.dtype, k_t.dtype)
        return out.to(torch.float64) if torch.float64 in (q_s.dtype, q_t.dtype) else out

    @staticmethod
    def backward(ctx, grad_out):
        q_s, k_s, q_t, k_t, mask_i8, span, grams, pairs = saving.saved_tensors(ctx)
        DS, DT, DSP, DTP, block_l = ctx.dims
        B, H, L, _ = q_s.shape
        alpha, beta = 1.0 / math.sqrt(DS), 1.0 / math.sqrt(DT)
        coef = (2.0 * grad_out.to(torch.float32) / pairs).reshape(1).contiguous()
        gram_stride = grams.shape[1]
        g_qss, g_kss = grams[:, : DSP * DSP], grams[:, DSP * DSP: 2 * DSP * DSP]
        o = 2 * DSP * DSP
        g_qtt, g_ktt = grams[:, o: o + DTP * DTP], grams[:, o + DTP * DTP: o + 2 * DTP * DTP]
        o += 2 * DTP * DTP
        g_qst, g_kst = grams[:, o: o + DSP * DTP], grams[:, o + DSP * DTP: o + 2 * DSP * DTP]

        def launch(x, y, g_same, g_cross, dx, dy, dxp, dyp, cross_t, s_same, s_cross, out_dtype):
            out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
            _GRAM_BACKWARD(
                lambda meta: (B * H, triton.cdiv(L, meta["BLOCK_L"])),
                (x, y, g_same, g_cross, mask_i8, span, coef, out, H, L,
                 *x.stride(), *y.stride(), *mask_i8.stride(), *out.stride(), gram_stride, s_same, s_cross),
                dict(BLOCK_L=block_l, **_GRAM_BWD_LAUNCH),
                DX=dx, DY=dy, DXP=dxp, DYP=dyp, CROSS_T=cross_t, HAS_MASK=ctx.has_mask,
                GRAM_PRECISION=gram_precision(x.dtype),
            )
            return out

        need = ctx.needs_input_grad
        dq_s = dk_s = dq_t = dk_t = None
        ab = alpha * beta
        if need[0]:
            dq_s = launch(q_s, q_t, g_kss, g_kst, DS, DT, DSP, DTP, True, alpha * alpha, ab, ctx.in_dtypes[0])
        if need[1]:
            dk_s = launch(k_s, k_t, g_qss, g_qst, DS, DT, DSP, DTP, True, alpha * alpha, ab, ctx.in_dtypes[1])
        if need[2]:
            dq_t = launch(q_t, q_s, g_ktt, g_kst, DT, DS, DTP, DSP, False, beta * beta, ab, ctx.in_dtypes[2])
        if need[3]:
            dk_t = launch(k_t, k_s, g_qtt, g_qst, DT, DS, DTP, DSP, False, beta * beta, ab, ctx.in_dtypes[3])
        return dq_s, dk_s, dq_t, dk_t, None


def attention_mse(
    q_s: torch.Tensor, k_s: torch.Tensor, q_t: torch.Tensor, k_t: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Fused TinyBERT attention-score MSE. q, k: [B, H, L, d] (any strides), mask: [B, L] bool or None.

    Inputs are assumed validated (call :func:`fastkd.losses.attention_mse` for checked input).
    """
    return AttentionMSEFunction.apply(q_s, k_s, q_t, k_t, mask)
