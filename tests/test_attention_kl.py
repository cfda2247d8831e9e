"""The fused attention-KL Triton kernel (kernels/attention_kl.py) against an independent float64 computation.

The float64 version loops over sequences and keeps only each sequence's valid tokens (no masking trick, no code
shared with fastkd). Half-precision inputs are compared with float64 math on the same rounded values, so what is
left is the kernel's own error. Tolerances (‖out − ref‖/‖ref‖):

* loss value: 1e-5 for every input dtype (scores and softmax statistics are fp32 whatever the input dtype);
* grads dq_s, dk_s: fp32 1e-5, fp16 2e-3, bf16 5e-3. Grads are returned in the student's dtype, so the bf16/fp16
  floor is the final rounding alone (bf16 ≈ 1.7e-3 rms); the kernel's half-precision MMAs add little on top.
* scores of ±1e3 ("large logits"): 1e-4 for the value and the fp32 grads. The interpreter measures ~1e-6; the
  budget is for the GPU, where fp32 scores come from 3-pass tf32 MMAs (~1e-4 absolute on a score of 1e3, which
  the exponentials turn into relative error of the probabilities).

Without a GPU the kernels run in Triton's interpreter (small 16×16 tiles, so L = 17 and 40 cross tile edges).
"""

import functools
import math
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from fastkd.kernels import attention_kl as akl  # noqa: E402

from fastkd import losses  # noqa: E402
from fastkd.losses.checks import value_checks  # noqa: E402
from tests.helpers import DEVICE, DTYPES, attention_kl_f64, rel_err  # noqa: E402  # noqa: E402, F401
from tests.helpers import make_mask as _make_mask  # noqa: E402

make_mask = functools.partial(_make_mask, device=DEVICE)
VALUE_TOL = 1e-5
GRAD_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 5e-3}
LARGE_TOL = 1e-4


pytestmark = pytest.mark.usefixtures("triton_backend")


# ---------------------------------------------------------------- independent float64 computation


def float64_loss_and_grads(q_s, k_s, q_t, k_t, mask, upstream):
    """(loss, dq_s, dk_s) in float64 from the (already rounded) inputs, with upstream grad ``upstream``."""
    q64 = q_s.detach().cpu().double().requires_grad_()
    k64 = k_s.detach().cpu().double().requires_grad_()
    loss = attention_kl_f64(q64, k64, q_t.detach().cpu().double(), k_t.detach().cpu().double(),
                              None if mask is None else mask.cpu())
    dq, dk = torch.autograd.grad(loss * upstream, (q64, k64))
    return loss.detach(), dq, dk


def fused_loss_and_grads(q_s, k_s, q_t, k_t, mask, upstream, **kw):
    q_s = q_s.detach().requires_grad_()
    k_s = k_s.detach().requires_grad_()
    loss = losses.attention_kl(q_s, k_s, q_t, k_t, mask) if not kw else akl.attention_kl(q_s, k_s, q_t, k_t,
                                                                                         mask, **kw)
    dq, dk = torch.autograd.grad(loss * upstream, (q_s, k_s))
    return loss, dq, dk


def randn(shape, dtype, gen, scale=1.0):
    return (torch.randn(*shape, generator=gen) * scale).to(dtype).to(DEVICE)


def assert_close(out, ref, tol, what):
    if float(ref.norm()) == 0.0:  # L = 1: every softmax is [1], so loss and grads are exactly 0
        assert float(out.detach().double().norm()) == 0.0, f"{what}: expected exactly 0, got {out}"
        return
    err = rel_err(out.cpu(), ref)
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol:g}"


# ---------------------------------------------------------------- correctness


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mask_kind", ["none", "prefix", "holes", "single"])
@pytest.mark.parametrize("L", [1, 5, 17, 40])
def test_matches_float64(L, mask_kind, dtype, gen):
    B, H, d_s = 2, 2, 8
    d_t = 12 if L in (1, 17) else 24  # head dims differ between student and teacher; 12, 24 not powers of 2
    q_s, k_s = randn((B, H, L, d_s), dtype, gen), randn((B, H, L, d_s), dtype, gen)
    q_t, k_t = randn((B, H, L, d_t), dtype, gen), randn((B, H, L, d_t), dtype, gen)
    mask = make_mask(mask_kind, B, L, gen)
    upstream = 0.5 + float(torch.rand((), generator=gen)) * 3  # the scalar's grad is not 1

    loss, dq, dk = fused_loss_and_grads(q_s, k_s, q_t, k_t, mask, upstream)
    ref_loss, ref_dq, ref_dk = float64_loss_and_grads(q_s, k_s, q_t, k_t, mask, upstream)

    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert dq.dtype == dtype and dk.dtype == dtype and dq.shape == q_s.shape and dk.shape == k_s.shape
    assert_close(loss, ref_loss, VALUE_TOL, "loss")
    assert_close(dq, ref_dq, GRAD_TOL[dtype], "dq_s")
    assert_close(dk, ref_dk, GRAD_TOL[dtype], "dk_s")
    if mask is not None:  # padded tokens, as queries or as keys, get exactly zero grad
        pad = ~mask[:, None, :, None].expand_as(dq)
        assert not dq[pad].any() and not dk[pad].any()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nearly_converged_student_keeps_its_gradient(dtype, gen):
    # Student ≈ teacher (late in training): dQ = (P_s − P_t)·K_s is a small difference of two flash-style
    # outputs that the forward accumulates separately, so rounding each P to half precision once would put
    # ~|P·K|/|dQ| times the rounding error on it (1.4e-2 in bf16 here, 3x the budget); P is split hi + lo.
    B, H, L, d = 2, 2, 40, 16
    q_t, k_t = randn((B, H, L, d), torch.float32, gen, 1.5), randn((B, H, L, d), torch.float32, gen, 1.5)
    q_s = (q_t + 0.02 * torch.randn(q_t.shape, generator=gen).to(DEVICE)).to(dtype)
    k_s = (k_t + 0.02 * torch.randn(k_t.shape, generator=gen).to(DEVICE)).to(dtype)
    q_t, k_t = q_t.to(dtype), k_t.to(dtype)
    mask = make_mask("holes", B, L, gen)
    loss, dq, dk = fused_loss_and_grads(q_s, k_s, q_t, k_t, mask, 1.0)
    ref_loss, ref_dq, ref_dk = float64_loss_and_grads(q_s, k_s, q_t, k_t, mask, 1.0)
    assert float(ref_loss) < 1e-2  # really near convergence
    # A KL of ~1e-3 is a difference of fp32 log-normalisers ~10⁴ times larger: fp32 gives it to ~1e-5.
    assert_close(loss, ref_loss, LARGE_TOL, "loss")
    # Likewise fp32's p_s − p_t carries ~1e-7·p absolute error against a difference ~50x smaller than p (1.6e-5
    # measured), so fp32 grads get 1e-4 here; the half-precision budgets are the usual ones.
    grad_tol = max(LARGE_TOL, GRAD_TOL[dtype])
    assert_close(dq, ref_dq, grad_tol, "dq_s")
    assert_close(dk, ref_dk, grad_tol, "dk_s")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("mask_kind", ["none", "holes"])
def test_large_logits(mask_kind, dtype, gen):
    # q, k ~ N(0, 18²): scores q·k/√d have std ≈ 330 and reach ±1e3; the online softmax must stay finite.
    B, H, L, d_s, d_t = 2, 2, 40, 8, 12
    q_s, k_s = randn((B, H, L, d_s), dtype, gen, 18.0), randn((B, H, L, d_s), dtype, gen, 18.0)
    q_t, k_t = randn((B, H, L, d_t), dtype, gen, 18.0), randn((B, H, L, d_t), dtype, gen, 18.0)
    mask = make_mask(mask_kind, B, L, gen)
    loss, dq, dk = fused_loss_and_grads(q_s, k_s, q_t, k_t, mask, 1.7)
    ref_loss, ref_dq, ref_dk = float64_loss_and_grads(q_s, k_s, q_t, k_t, mask, 1.7)
    s = q_s.double() @ k_s.double().transpose(-1, -2) / math.sqrt(d_s)
    assert float(s.abs().max()) > 1e3  # the test really reaches the intended magnitude
    assert torch.isfinite(loss) and torch.isfinite(dq).all() and torch.isfinite(dk).all()
    assert_close(loss, ref_loss, LARGE_TOL, "loss")
    grad_tol = max(LARGE_TOL, GRAD_TOL[dtype])
    assert_close(dq, ref_dq, grad_tol, "dq_s")
    assert_close(dk, ref_dk, grad_tol, "dk_s")


def test_large_scores_equal_up_to_a_row_shift_give_zero(gen):
    # S_s = S_t + c_i with |c_i| up to ~1e3 (k_s = k_t + v, q_s = q_t): identical softmaxes, KL ≈ 0 (float64:
    # ~1e-11, from k_t + v's rounding). Summing p_t·(s_t − s_s) − lse_t + lse_s directly in fp32 cancels large
    # terms and lands at ~1e-6; the kernel's shifted accumulation stays at ~1e-8.
    B, H, L, d = 2, 2, 40, 16
    q = randn((B, H, L, d), torch.float32, gen)
    k = randn((B, H, L, d), torch.float32, gen)
    v = randn((B, H, 1, d), torch.float32, gen, 300.0)
    loss = akl.attention_kl(q, k + v, q, k, None)
    shift = (q @ v.transpose(-1, -2)).abs() / math.sqrt(d)
    assert float(shift.mean()) > 100 and float(shift.max()) > 500
    ref = attention_kl_f64(q.double(), (k + v).double(), q.double(), k.double(), None)
    assert abs(float(loss) - float(ref)) < 1e-7


@pytest.mark.parametrize("block_m,block_n", [(16, 32), (32, 16)])
def test_unequal_tiles(block_m, block_n, gen):
    # Query and key tiles of different sizes: the forward/dQ kernels tile rows by block_m, dK keys by block_n.
    B, H, L, d_s, d_t = 2, 3, 40, 8, 24
    q_s, k_s = randn((B, H, L, d_s), torch.float32, gen), randn((B, H, L, d_s), torch.float32, gen)
    q_t, k_t = randn((B, H, L, d_t), torch.float32, gen), randn((B, H, L, d_t), torch.float32, gen)
    mask = make_mask("holes", B, L, gen)
    config = akl.AttentionKLConfig(block_m=block_m, block_n=block_n, num_warps=4, num_stages=1)
    loss, dq, dk = fused_loss_and_grads(q_s, k_s, q_t, k_t, mask, 1.3, config=config)
    ref_loss, ref_dq, ref_dk = float64_loss_and_grads(q_s, k_s, q_t, k_t, mask, 1.3)
    assert_close(loss, ref_loss, VALUE_TOL, "loss")
    assert_close(dq, ref_dq, GRAD_TOL[torch.float32], "dq_s")
    assert_close(dk, ref_dk, GRAD_TOL[torch.float32], "dk_s")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_relation_kl_non_contiguous_views(dtype, gen):
    # relation_kl hands the kernel q = k = a [B, R, L, D/R] head-split view of [B, L, D] (non-contiguous, and
    # the same tensor twice); D/R = 6 and 10 are not powers of 2.
    B, L, R = 2, 17, 2
    x_s = randn((B, L, R * 6), dtype, gen).requires_grad_()
    x_t = randn((B, L, R * 10), dtype, gen)
    mask = make_mask("prefix", B, L, gen)
    loss = losses.relation_kl(x_s, x_t, R, mask)
    (dx,) = torch.autograd.grad(loss * 2.0, x_s)

    x64 = x_s.detach().cpu().double().requires_grad_()
    rs = x64.reshape(B, L, R, 6).permute(0, 2, 1, 3)
    rt = x_t.cpu().double().reshape(B, L, R, 10).permute(0, 2, 1, 3)
    ref = attention_kl_f64(rs, rs, rt, rt, mask.cpu())
    (ref_dx,) = torch.autograd.grad(ref * 2.0, x64)
    assert dx.dtype == dtype and dx.shape == x_s.shape
    assert_close(loss, ref.detach(), VALUE_TOL, "loss")
    assert_close(dx, ref_dx, GRAD_TOL[dtype], "dx_s")


def test_strided_inputs_without_copies(gen):
    # [B, L, H, d] storage seen as [B, H, L, d], and a last dim with stride 2: the kernels read them in place.
    B, H, L, d_s, d_t = 2, 2, 17, 8, 12
    q_s = randn((B, L, H, d_s), torch.float32, gen).transpose(1, 2)
    k_s = randn((B, H, L, 2 * d_s), torch.float32, gen)[..., ::2]
    q_t = randn((B, L, H, d_t), torch.float32, gen).transpose(1, 2)
    k_t = randn((B, H, d_t, L), torch.float32, gen).transpose(2, 3)
    assert not any(x.is_contiguous() for x in (q_s, k_s, q_t, k_t))
    mask = make_mask("holes", B, L, gen)
    loss, dq, dk = fused_loss_and_grads(q_s, k_s, q_t, k_t, mask, 0.7)
    ref_loss, ref_dq, ref_dk = float64_loss_and_grads(q_s, k_s, q_t, k_t, mask, 0.7)
    assert_close(loss, ref_loss, VALUE_TOL, "loss")
    assert_close(dq, ref_dq, GRAD_TOL[torch.float32], "dq_s")
    assert_close(dk, ref_dk, GRAD_TOL[torch.float32], "dk_s")


def test_mixed_student_teacher_dtypes(gen):
    # bf16 student, fp32 teacher: each side's scores use its own dtype's MMA.
    B, H, L, d_s, d_t = 2, 2, 17, 8, 12
    q_s, k_s = randn((B, H, L, d_s), torch.bfloat16, gen), randn((B, H, L, d_s), torch.bfloat16, gen)
    q_t, k_t = randn((B, H, L, d_t), torch.float32, gen), randn((B, H, L, d_t), torch.float32, gen)
    loss, dq, dk = fused_loss_and_grads(q_s, k_s, q_t, k_t, None, 1.0)
    ref_loss, ref_dq, ref_dk = float64_loss_and_grads(q_s, k_s, q_t, k_t, None, 1.0)
    assert dq.dtype == torch.bfloat16
    assert_close(loss, ref_loss, VALUE_TOL, "loss")
    assert_close(dq, ref_dq, GRAD_TOL[torch.bfloat16], "dq_s")
    assert_close(dk, ref_dk, GRAD_TOL[torch.bfloat16], "dk_s")


# ---------------------------------------------------------------- autograd contract


def test_grad_only_where_needed_and_deterministic(gen):
    B, H, L, d_s, d_t = 2, 2, 40, 8, 12
    q_s, k_s = randn((B, H, L, d_s), torch.float16, gen), randn((B, H, L, d_s), torch.float16, gen)
    q_t, k_t = randn((B, H, L, d_t), torch.float16, gen), randn((B, H, L, d_t), torch.float16, gen)
    mask = make_mask("holes", B, L, gen)
    _, dq1, dk1 = fused_loss_and_grads(q_s, k_s, q_t, k_t, mask, 1.0)
    _, dq2, dk2 = fused_loss_and_grads(q_s, k_s, q_t, k_t, mask, 1.0)
    assert torch.equal(dq1, dq2) and torch.equal(dk1, dk2)  # no atomics: bitwise reproducible

    k_only = k_s.detach().requires_grad_()
    teacher_q = q_t.detach().requires_grad_()  # the teacher never gets a grad, even if it asks for one
    loss = losses.attention_kl(q_s, k_only, teacher_q, k_t, mask)
    loss.backward()
    assert torch.equal(k_only.grad, dk1) and teacher_q.grad is None


def test_saves_row_statistics_and_dq_only(gen):
    # Extra memory is linear in L: besides the inputs themselves, autograd keeps the [B, L] mask, the [B] valid
    # spans (padded-tile skipping), two fp32 per-row log-normalisers, a scalar, and the forward's fp32 dQ
    # ([B, H, L, d_s]) when q_s wants a grad; never anything [B, H, L, L].
    B, H, L, d_s, d_t = 2, 3, 40, 8, 12
    q_t, k_t = randn((B, H, L, d_t), torch.float32, gen), randn((B, H, L, d_t), torch.float32, gen)
    mask = make_mask("prefix", B, L, gen)
    for q_grad, dq_size in ((True, B * H * L * d_s), (False, 0)):
        q_s = randn((B, H, L, d_s), torch.float32, gen).requires_grad_(q_grad)
        k_s = randn((B, H, L, d_s), torch.float32, gen).requires_grad_()
        loss = losses.attention_kl(q_s, k_s, q_t, k_t, mask)
        saved = [t for t in loss.grad_fn.saved_tensors if t is not None]
        inputs = {x.data_ptr() for x in (q_s, k_s, q_t, k_t)}
        extra = sum(t.numel() for t in saved if t.data_ptr() not in inputs)
        assert len(saved) >= 4 and extra == 2 * B * H * L + B * L + B + 1 + dq_size


@pytest.mark.filterwarnings("ignore:All-NaN slice:RuntimeWarning")  # the interpreter notices the NaN too
def test_nan_input_is_not_hidden(gen):
    B, H, L, d = 2, 2, 17, 8
    q_s, k_s = randn((B, H, L, d), torch.float32, gen), randn((B, H, L, d), torch.float32, gen)
    q_t, k_t = randn((B, H, L, d), torch.float32, gen), randn((B, H, L, d), torch.float32, gen)
    q_s[1, 0, 3, 2] = float("nan")
    with pytest.raises(ValueError, match=r"q_s: expected finite values"):  # the API refuses it
        fused_loss_and_grads(q_s, k_s, q_t, k_t, None, 1.0)
    with value_checks(False):  # a trainer that checks its own values: the kernel propagates it, never hides it
        loss, dq, _ = fused_loss_and_grads(q_s, k_s, q_t, k_t, None, 1.0)
    assert torch.isnan(loss) and torch.isnan(dq).any()


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("arg", ["q_t", "k_t"])
def test_non_finite_teacher_is_refused_on_both_paths(gen, monkeypatch, backend, bad, arg):
    """An all-NaN teacher gave loss 0.0 with NaN gradients on the torch path (the softmax zeroed it)."""
    monkeypatch.setenv("FASTKD_BACKEND", backend)
    B, H, L, d = 2, 2, 9, 8
    x = {n: randn((B, H, L, d), torch.float32, gen) for n in ("q_s", "k_s", "q_t", "k_t")}
    x[arg] = torch.full_like(x[arg], bad)
    with pytest.raises(ValueError, match=rf"{arg}: expected finite values"):
        losses.attention_kl(x["q_s"], x["k_s"], x["q_t"], x["k_t"], None)
    v_s, v_t = randn((B, L, 16), torch.float32, gen), randn((B, L, 16), torch.float32, gen)
    v_t[1, 4, 3] = bad  # one value of one valid token
    with pytest.raises(ValueError, match=r"x_t: expected finite values"):
        losses.relation_kl(v_s, v_t, 2)


def test_float64_inputs_use_float64_reference(gen, monkeypatch):
    # The public entry sends float64 to the float64 reference (the kernel accumulates in fp32), on either backend.
    monkeypatch.setenv("FASTKD_BACKEND", "triton")
    B, H, L, d = 1, 2, 5, 8
    xs = [randn((B, H, L, d), torch.float64, gen) for _ in range(4)]
    loss = losses.attention_kl(*xs, None)
    assert loss.dtype == torch.float64
    assert rel_err(loss.cpu(), attention_kl_f64(*[x.cpu() for x in xs], None)) < 1e-12


def test_bad_input_is_rejected_before_the_kernel(gen):
    q_s, k_s = randn((2, 2, 5, 8), torch.float32, gen), randn((2, 2, 5, 8), torch.float32, gen)
    q_t, k_t = randn((2, 3, 5, 8), torch.float32, gen), randn((2, 3, 5, 8), torch.float32, gen)
    with pytest.raises(ValueError, match="q_t"):
        losses.attention_kl(q_s, k_s, q_t, k_t)
    with pytest.raises(ValueError, match="mask"):
        losses.attention_kl(q_s, k_s, q_s, k_s, torch.ones(2, 4, dtype=torch.bool, device=DEVICE))


def test_interpreter_tiles_are_crossed():
    # The correctness tests above rely on L = 17 and 40 spanning several tiles; keep that true.
    cfg = akl.default_config(8, 12)
    if os.environ.get("TRITON_INTERPRET") == "1":
        assert cfg.block_m < 17 and cfg.block_n < 17
    else:
        assert cfg.block_m >= 16 and cfg.block_n >= 16


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_padded_tiles_are_skipped_exactly(dtype, gen):
    """Padded-tile skipping (key tiles past a row's last valid token; query/key tiles that start past it): an
    all-padding row (the kernel's own input, which fastkd.losses refuses but value_checks(False) lets through),
    one valid token, lengths one past and one short of a tile (interpreter tiles: 16), a full row, and a row
    whose mask has a hole before its last valid token. Same tolerances as test_matches_float64."""
    B, H, L, d_s, d_t = 6, 2, 40, 8, 12
    lens = torch.tensor([0, 1, 17, 15, 40, 33])
    mask = torch.arange(L)[None] < lens[:, None]
    mask[5, 3:9] = False  # a hole: the row's span is still 33
    q_s, k_s = randn((B, H, L, d_s), dtype, gen), randn((B, H, L, d_s), dtype, gen)
    q_t, k_t = randn((B, H, L, d_t), dtype, gen), randn((B, H, L, d_t), dtype, gen)
    upstream = 1.7
    loss, dq, dk = fused_loss_and_grads(q_s, k_s, q_t, k_t, mask.to(DEVICE), upstream, config=akl.default_config(
        d_s, d_t))
    # The reference without the all-padding row: it has no valid query, so adds nothing to sum or count.
    ref_loss, ref_dq, ref_dk = float64_loss_and_grads(q_s[1:], k_s[1:], q_t[1:], k_t[1:], mask[1:], upstream)
    assert_close(loss, ref_loss, VALUE_TOL, "loss")
    assert_close(dq[1:], ref_dq, GRAD_TOL[dtype], "dq_s")
    assert_close(dk[1:], ref_dk, GRAD_TOL[dtype], "dk_s")
    pad = ~mask[:, None, :, None].expand_as(dq).to(DEVICE)
    assert float(dq[pad].abs().max()) == 0.0 and float(dk[pad].abs().max()) == 0.0
    assert torch.isfinite(dq).all() and torch.isfinite(dk).all()
