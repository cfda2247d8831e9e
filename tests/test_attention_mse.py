"""Fused attention_mse (fastkd.kernels.attention_mse) through fastkd.losses with the Triton backend forced.

Ground truth is an independent float64 loop that keeps only each sequence's valid tokens (no masking trick,
no Gram identity). Half-precision inputs are compared with float64 math on the same rounded values.
Tolerances (‖out − ref‖/‖ref‖): the loss 1e-5 for every dtype (fp32 accumulation only); gradients 1e-5 in
fp32, 2e-3 in fp16 and 1.6e-2 in bf16 (the gradients are returned in the input dtype: one rounding of the
output, 2^-11 and 2^-8 relative, plus one of the fp32 Gram/tile products).
"""

import functools
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import fastkd.kernels.attention_mse as kernel  # noqa: E402
import pytest  # noqa: E402

from fastkd import losses  # noqa: E402
from fastkd.losses.checks import value_checks  # noqa: E402
from tests.helpers import DEVICE, DTYPES, UPSTREAM, attention_mse_f64, rel_err  # noqa: E402  # noqa: E402, F401
from tests.helpers import make_mask as _make_mask  # noqa: E402

make_mask = functools.partial(_make_mask, device=DEVICE)
GRAD_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
LOSS_TOL = 1e-5


pytestmark = pytest.mark.usefixtures("triton_backend")


def rand(shape, dtype, gen, scale=1.0):
    return (torch.randn(*shape, generator=gen) * scale).to(DEVICE, dtype)


def check_against_float64(q_s, k_s, q_t, k_t, mask, loss_tol, grad_tol):
    leaves = [x.detach().requires_grad_() for x in (q_s, k_s, q_t, k_t)]
    out = losses.attention_mse(*leaves, mask)
    assert out.dim() == 0 and out.dtype == torch.float32
    out.backward(torch.tensor(UPSTREAM, device=DEVICE))
    ref_leaves = [x.detach().double().requires_grad_() for x in leaves]
    ref = attention_mse_f64(*ref_leaves, mask)
    (ref * UPSTREAM).backward()
    assert torch.isfinite(out)
    assert rel_err(out, ref) < loss_tol, (float(out), float(ref))
    for name, x, r in zip(("q_s", "k_s"), leaves, ref_leaves, strict=False):
        assert x.grad.dtype == x.dtype and x.grad.shape == x.shape, name
        assert rel_err(x.grad, r.grad) < grad_tol, (name, rel_err(x.grad, r.grad))
    # The documented rule on both paths: teacher tensors get no gradient, even when they require one.
    assert leaves[2].grad is None and leaves[3].grad is None
    return out, ref


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mask_kind", ["none", "prefix", "holes", "single"])
def test_matches_float64(mask_kind, dtype, gen):
    # L = 37 is not a multiple of any block; head dims 24 and 40 are not powers of two and differ.
    B, H, L, d_s, d_t = 2, 2, 37, 24, 40
    q_s, k_s = rand((B, H, L, d_s), dtype, gen), rand((B, H, L, d_s), dtype, gen)
    q_t, k_t = rand((B, H, L, d_t), dtype, gen), rand((B, H, L, d_t), dtype, gen)
    check_against_float64(q_s, k_s, q_t, k_t, make_mask(mask_kind, B, L, gen), LOSS_TOL, GRAD_TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_non_contiguous_inputs(dtype, gen):
    # As BERT makes them: [B, L, H, d] transposed to [B, H, L, d]; the teacher also strided in d.
    B, H, L, d_s, d_t = 2, 3, 21, 16, 32
    q_s = rand((B, L, H, d_s), dtype, gen).transpose(1, 2)
    k_s = rand((B, L, H, d_s), dtype, gen).transpose(1, 2)
    q_t = rand((B, L, H, 2 * d_t), dtype, gen).transpose(1, 2)[..., ::2]
    k_t = rand((B, H, d_t, L), dtype, gen).transpose(2, 3)
    assert not any(x.is_contiguous() for x in (q_s, k_s, q_t, k_t))
    check_against_float64(q_s, k_s, q_t, k_t, make_mask("prefix", B, L, gen), LOSS_TOL, GRAD_TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_large_logits(dtype, gen):
    # |S| in the hundreds: the Gram entries reach ~1e5, their products ~1e10, still well inside fp32.
    B, H, L, d = 2, 2, 40, 32
    q_s, k_s, q_t, k_t = (rand((B, H, L, d), dtype, gen, scale=6.0) for _ in range(4))
    out, _ = check_against_float64(q_s, k_s, q_t, k_t, make_mask("holes", B, L, gen), LOSS_TOL, GRAD_TOL[dtype])
    assert float(out.detach()) > 1e3


def near_equal(B, H, L, d, eps, gen):
    """Teacher Q, K and a student equal to it up to eps·noise: ρ = loss/(‖S_s‖² + ‖S_t‖²) ≈ eps²."""
    q_t, k_t = torch.randn(B, H, L, d, generator=gen), torch.randn(B, H, L, d, generator=gen)
    q_s = q_t + eps * torch.randn(B, H, L, d, generator=gen)
    k_s = k_t + eps * torch.randn(B, H, L, d, generator=gen)
    return [x.to(DEVICE) for x in (q_s, k_s, q_t, k_t)]


def test_near_equal_small_loss_is_accurate(gen):
    """The cancellation case: student ≈ teacher, loss ~1e-6 of ‖S‖². The fp32 Gram form alone loses about
    1e-2 relative here; the on-device direct fallback must keep the loss at fp32 accuracy."""
    B, H, L, d = 2, 2, 70, 32
    q_s, k_s, q_t, k_t = near_equal(B, H, L, d, 1e-3, gen)
    mask = make_mask("prefix", B, L, gen)
    # Gradients are computed in Gram form (first-order cancellation only): measured ~1.3e-4 at this ρ.
    out, ref = check_against_float64(q_s, k_s, q_t, k_t, mask, LOSS_TOL, 1e-3)
    assert float(ref.detach()) < 1e-4


def test_near_equal_needs_the_fallback(gen, monkeypatch):
    """Shows the fallback matters: with it disabled the same inputs miss the fp32 tolerance by orders of
    magnitude, so test_near_equal_small_loss_is_accurate cannot pass by luck."""
    B, H, L, d = 2, 2, 70, 32
    q_s, k_s, q_t, k_t = near_equal(B, H, L, d, 1e-3, gen)
    ref = attention_mse_f64(q_s, k_s, q_t, k_t, None)
    monkeypatch.setattr(kernel, "CANCELLATION_RATIO", 0.0)
    gram_only = losses.attention_mse(q_s, k_s, q_t, k_t)
    assert rel_err(gram_only, ref) > 1e-4


def test_fallback_is_per_head(gen):
    # Head 0 ill-conditioned (student ≈ teacher), head 1 not: both must come out right in one call.
    B, H, L, d = 2, 2, 45, 16
    q_s, k_s, q_t, k_t = near_equal(B, H, L, d, 1e-3, gen)
    q_s[:, 1] = torch.randn(B, L, d, generator=gen).to(DEVICE)
    check_against_float64(q_s, k_s, q_t, k_t, make_mask("holes", B, L, gen), LOSS_TOL, 1e-3)


def test_saves_grams_not_maps(gen):
    # Extra memory held for the backward: six d×d fp32 Grams per (batch, head) (O(B·H·d²), independent of L),
    # the [B, L] mask, the [B] spans and a scalar; never anything L×L (bench/roofline.py states the same sum).
    B, H, L, d_s, d_t = 2, 3, 40, 8, 24
    dsp, dtp = 16, 32  # padded to powers of two, at least 16
    q_s, k_s = (rand((B, H, L, d_s), torch.float32, gen).requires_grad_() for _ in range(2))
    q_t, k_t = rand((B, H, L, d_t), torch.float32, gen), rand((B, H, L, d_t), torch.float32, gen)
    loss = losses.attention_mse(q_s, k_s, q_t, k_t, make_mask("prefix", B, L, gen))
    saved = [t for t in loss.grad_fn.saved_tensors if t is not None]
    inputs = {x.data_ptr() for x in (q_s, k_s, q_t, k_t)}
    extra = sum(t.numel() for t in saved if t.data_ptr() not in inputs)
    assert extra == B * H * (2 * dsp * dsp + 2 * dtp * dtp + 2 * dsp * dtp) + B * L + B + 1


def test_student_only_grads_and_float64_inputs(gen):
    B, H, L, d_s, d_t = 1, 2, 19, 8, 16
    q_s = rand((B, H, L, d_s), torch.float64, gen).requires_grad_()
    k_s = rand((B, H, L, d_s), torch.float64, gen).requires_grad_()
    q_t, k_t = rand((B, H, L, d_t), torch.float64, gen), rand((B, H, L, d_t), torch.float64, gen)
    out = losses.attention_mse(q_s, k_s, q_t, k_t)
    assert out.dtype == torch.float64
    out.backward()
    ref = attention_mse_f64(q_s, k_s, q_t, k_t, None)
    assert rel_err(out, ref) < LOSS_TOL  # computed in fp32 inside the kernel
    assert q_s.grad.dtype == torch.float64 and q_t.grad is None


def test_nan_propagates_from_valid_tokens_only(gen):
    B, H, L, d = 2, 2, 20, 16
    q_s, k_s, q_t, k_t = (rand((B, H, L, d), torch.float32, gen) for _ in range(4))
    mask = torch.ones(B, L, dtype=torch.bool, device=DEVICE)
    mask[1, 15:] = False
    padded = q_s.clone()
    padded[1, 0, 17] = float("nan")  # a padded token: excluded, like the reference
    assert torch.isfinite(losses.attention_mse(padded, k_s, q_t, k_t, mask))
    valid = q_s.clone()
    valid[1, 0, 3] = float("nan")
    with pytest.raises(ValueError, match=r"q_s: expected finite values at valid"):  # the API refuses it
        losses.attention_mse(valid, k_s, q_t, k_t, mask)
    with value_checks(False):  # a trainer that checks its own values: the kernel propagates it, never hides it
        assert torch.isnan(losses.attention_mse(valid, k_s, q_t, k_t, mask))


def test_bad_input_raises_before_launch(gen):
    q = rand((2, 2, 8, 16), torch.float32, gen)
    with pytest.raises(ValueError, match="k_s"):
        losses.attention_mse(q, q[:, :, :4], q, q)
    with pytest.raises(ValueError, match="mask"):
        losses.attention_mse(q, q, q, q, torch.ones(2, 7, dtype=torch.bool, device=DEVICE))


def _padded_tile_mask(L: int) -> torch.Tensor:
    """An all-padding row, one valid token, lengths one past and one short of a 16-row interpreter tile, a full
    row, and a row with a hole before its last valid token."""
    mask = torch.arange(L)[None] < torch.tensor([0, 1, 17, 15, L, 30])[:, None]
    mask[5, 3:9] = False
    return mask.to(DEVICE)


@pytest.mark.parametrize(("dtype", "near"), [*((dt, False) for dt in DTYPES), (torch.float32, True)],
                         ids=lambda v: str(v) if not isinstance(v, bool) else ("direct" if v else "gram"))
def test_padded_tiles_are_skipped_exactly(dtype, near, gen):
    """Padded-tile skipping in the Gram forward (rows past the last valid token), the direct kernel (key tiles
    past it, query tiles starting past it) and the Gram backward (row tiles past it store zeros). The all-padding
    row is the kernel's own input (fastkd.losses refuses it unless value_checks are off); the reference leaves
    it out, since it adds no valid pair. Same tolerances as test_matches_float64 (direct: as the fallback's; in
    fp32 only: a near-equal pair's gradients, ~1e-7, are below what fp16/bf16 resolve)."""
    B, H, L, d = 6, 2, 37, 16
    if near:  # every head ill-conditioned: the direct (streaming) kernel computes the loss
        q_s, k_s, q_t, k_t = (x.to(dtype) for x in near_equal(B, H, L, d, 1e-3, gen))
    else:
        q_s, k_s, q_t, k_t = (rand((B, H, L, d), dtype, gen) for _ in range(4))
    mask = _padded_tile_mask(L)
    leaves = [x.detach().requires_grad_() for x in (q_s, k_s)]
    with value_checks(False):
        out = kernel.attention_mse(*leaves, q_t, k_t, mask)
    out.backward(torch.tensor(UPSTREAM, device=DEVICE))
    ref_leaves = [x[1:].detach().double().requires_grad_() for x in (q_s, k_s)]
    ref = attention_mse_f64(*ref_leaves, q_t[1:].double(), k_t[1:].double(), mask[1:])
    (ref * UPSTREAM).backward()
    tol = 1e-3 if near else GRAD_TOL[dtype]
    assert rel_err(out, ref) < LOSS_TOL, (float(out), float(ref))
    for x, r in zip(leaves, ref_leaves, strict=True):
        assert rel_err(x.grad[1:], r.grad) < tol
        assert float(x.grad[0].abs().max()) == 0.0  # the all-padding row
        assert float(x.grad[~mask[:, None, :, None].expand_as(x.grad)].abs().max()) == 0.0
