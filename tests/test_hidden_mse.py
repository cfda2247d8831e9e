"""Fused hidden_mse (fastkd.kernels.hidden_mse) through fastkd.losses with the Triton backend forced.

Ground truth is an independent float64 loop over layer pairs and sequences that keeps only valid tokens.
Half-precision inputs are compared with float64 math on the same rounded values. Tolerances
(‖out − ref‖/‖ref‖): the loss 1e-5 for every dtype (fp32 accumulation only); gradients 1e-5 in fp32, 2e-3 in
fp16, 1.6e-2 in bf16 (R is rounded to the input dtype for the tensor-core products of the backward, and the
gradients are returned in the input dtype).
"""

import functools
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from fastkd import losses  # noqa: E402
from fastkd.losses.checks import value_checks  # noqa: E402
from tests.helpers import DEVICE, DTYPES, UPSTREAM, hidden_mse_f64, rel_err  # noqa: E402
from tests.helpers import make_mask as _make_mask  # noqa: E402

make_mask = functools.partial(_make_mask, device=DEVICE)
GRAD_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
LOSS_TOL = 1e-5


pytestmark = pytest.mark.usefixtures("triton_backend")


def rand(shape, dtype, gen, scale=1.0):
    return (torch.randn(*shape, generator=gen) * scale).to(DEVICE, dtype)


def check_against_float64(h_s, h_t, weight, bias, mask, grad_tol):
    leaves = [None if x is None else x.detach().requires_grad_() for x in (h_s, weight, bias)]
    h_t = h_t.detach()
    out = losses.hidden_mse(leaves[0], h_t, leaves[1], leaves[2], mask)
    assert out.dim() == 0 and out.dtype == torch.float32
    out.backward(torch.tensor(UPSTREAM, device=DEVICE))
    ref_leaves = [None if x is None else x.detach().double().requires_grad_() for x in leaves]
    ref = hidden_mse_f64(ref_leaves[0], h_t, ref_leaves[1], ref_leaves[2], mask)
    (ref * UPSTREAM).backward()
    assert torch.isfinite(out)
    assert rel_err(out, ref) < LOSS_TOL, (float(out.detach()), float(ref.detach()))
    for name, x, r in zip(("h_s", "weight", "bias"), leaves, ref_leaves, strict=True):
        if x is None:
            continue
        assert x.grad.dtype == x.dtype and x.grad.shape == x.shape, name
        tol = grad_tol[name] if isinstance(grad_tol, dict) else grad_tol
        assert rel_err(x.grad, r.grad) < tol, (name, rel_err(x.grad, r.grad))
    return out


# (layered, projected, with bias): d_s = 24 → d_t = 40 when projected (neither a power of two nor a block
# multiple); N = B·L = 26 rows, not a multiple of the row tile.
CONFIGS = {
    "single_projected": (False, True, True),
    "layered_projected": (True, True, True),
    "layered_identity_bias": (True, False, True),
    "single_identity": (False, False, False),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mask_kind", ["none", "prefix", "holes", "single"])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_matches_float64(config, mask_kind, dtype, gen):
    layered, projected, with_bias = CONFIGS[config]
    K, B, L, d_s = 3, 2, 13, 24
    d_t = 40 if projected else d_s
    lead = (K,) if layered else ()
    h_s, h_t = rand((*lead, B, L, d_s), dtype, gen), rand((*lead, B, L, d_t), dtype, gen)
    weight = rand((*lead, d_t, d_s), dtype, gen, scale=d_s**-0.5) if projected else None
    bias = rand((*lead, d_t), dtype, gen) if with_bias else None
    check_against_float64(h_s, h_t, weight, bias, make_mask(mask_kind, B, L, gen), GRAD_TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_non_contiguous_inputs(dtype, gen):
    K, B, L, d_s, d_t = 2, 3, 11, 20, 36
    h_s = rand((K, L, B, d_s), dtype, gen).transpose(1, 2)  # [K, B, L, d_s], rows not adjacent
    h_t = rand((K, B, L, 2 * d_t), dtype, gen)[..., ::2]  # strided features
    weight = rand((K, d_s, d_t), dtype, gen, scale=0.2).transpose(1, 2)  # [K, d_t, d_s], column-major
    bias = rand((d_t, K), dtype, gen).T
    assert not any(x.is_contiguous() for x in (h_s, h_t, weight, bias))
    check_against_float64(h_s, h_t, weight, bias, make_mask("holes", B, L, gen), GRAD_TOL[dtype])


def test_mixed_dtypes_bf16_activations_fp32_projection(gen):
    # As under autocast: bf16 hidden states, fp32 nn.Linear parameters. Tiles are cast in registers.
    B, L, d_s, d_t = 2, 17, 24, 40
    h_s, h_t = rand((B, L, d_s), torch.bfloat16, gen), rand((B, L, d_t), torch.bfloat16, gen)
    weight, bias = rand((d_t, d_s), torch.float32, gen, scale=0.2), rand((d_t,), torch.float32, gen)
    # The dot runs in fp32 (the wider dtype), so the fp32 parameter grads are fp32-accurate; dH_s is bf16.
    tol = {"h_s": GRAD_TOL[torch.bfloat16], "weight": 1e-5, "bias": 1e-5}
    check_against_float64(h_s, h_t, weight, bias, make_mask("prefix", B, L, gen), tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_large_values(dtype, gen):
    # Hidden states of size ~30 (post-LayerNorm outliers in BERT reach tens): R² ~1e3–1e4 per element.
    B, L, d_s, d_t = 2, 19, 24, 40
    h_s, h_t = rand((B, L, d_s), dtype, gen, scale=30.0), rand((B, L, d_t), dtype, gen, scale=30.0)
    weight, bias = rand((d_t, d_s), dtype, gen, scale=0.3), rand((d_t,), dtype, gen, scale=10.0)
    out = check_against_float64(h_s, h_t, weight, bias, make_mask("prefix", B, L, gen), GRAD_TOL[dtype])
    assert float(out.detach()) > 100


def test_float64_inputs_and_teacher_needs_no_grad(gen):
    B, L, d_s, d_t = 2, 9, 16, 24
    h_s = rand((B, L, d_s), torch.float64, gen).requires_grad_()
    h_t = rand((B, L, d_t), torch.float64, gen)
    weight = rand((d_t, d_s), torch.float64, gen, scale=0.25).requires_grad_()
    out = losses.hidden_mse(h_s, h_t, weight)
    assert out.dtype == torch.float64
    out.backward()
    assert rel_err(out, hidden_mse_f64(h_s, h_t, weight, None, None)) < LOSS_TOL
    assert h_s.grad.dtype == torch.float64 and weight.grad.dtype == torch.float64


def test_nan_propagates_from_valid_tokens_only(gen):
    B, L, d_s, d_t = 2, 10, 16, 24
    h_s, h_t = rand((B, L, d_s), torch.float32, gen), rand((B, L, d_t), torch.float32, gen)
    weight = rand((d_t, d_s), torch.float32, gen, scale=0.25)
    mask = torch.ones(B, L, dtype=torch.bool, device=DEVICE)
    mask[0, 6:] = False
    padded = h_s.clone()
    padded[0, 8, 3] = float("nan")
    assert torch.isfinite(losses.hidden_mse(padded, h_t, weight, None, mask))
    valid = h_s.clone()
    valid[0, 2, 3] = float("nan")
    with pytest.raises(ValueError, match=r"h_s: expected finite values at valid"):  # the API refuses it
        losses.hidden_mse(valid, h_t, weight, None, mask)
    with value_checks(False):  # a trainer that checks its own values: the kernel propagates it, never hides it
        assert torch.isnan(losses.hidden_mse(valid, h_t, weight, None, mask))


def test_bad_input_raises_before_launch(gen):
    h_s, h_t = rand((2, 5, 16), torch.float32, gen), rand((2, 5, 24), torch.float32, gen)
    with pytest.raises(ValueError, match="weight"):
        losses.hidden_mse(h_s, h_t)
    with pytest.raises(ValueError, match="weight"):
        losses.hidden_mse(h_s, h_t, rand((16, 24), torch.float32, gen))
    with pytest.raises(ValueError, match="bias"):
        losses.hidden_mse(h_s, h_t, rand((24, 16), torch.float32, gen), rand((16,), torch.float32, gen))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_keeps_the_residual_in_the_dot_dtype(dtype, gen):
    # The forward stores R = H_s·Wᵀ + b − H_t ([K, B·L, d_t], dot dtype, 0 on masked rows) for the cuBLAS
    # backward instead of recomputing it; that, and the scalar denominator, is all the extra memory.
    K, B, L, d_s, d_t = 2, 2, 9, 16, 24
    h_s = rand((K, B, L, d_s), dtype, gen).requires_grad_()
    h_t = rand((K, B, L, d_t), dtype, gen)
    weight = rand((K, d_t, d_s), dtype, gen, scale=0.25).requires_grad_()
    mask = make_mask("prefix", B, L, gen)
    out = losses.hidden_mse(h_s, h_t, weight, None, mask)
    saved = [t for t in out.grad_fn.saved_tensors if t is not None]
    inputs = {x.data_ptr() for x in (h_s, h_t, weight)}
    extra = [t for t in saved if t.data_ptr() not in inputs]
    assert sum(t.numel() for t in extra) == K * B * L * d_t + 1
    r = max(extra, key=lambda t: t.numel())
    assert r.dtype == dtype
    assert not r.view(K, B, L, d_t)[:, ~mask].any()  # masked rows hold exactly 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA autocast needs a GPU (the GPU session runs it)")
def test_under_cuda_autocast_the_projection_reaches_the_kernel_in_the_autocast_dtype(gen, monkeypatch):
    # As the trainer runs it: fp32 hidden states (LayerNorm's output under autocast) and fp32 fit_dense params.
    import fastkd.kernels.hidden_mse as kernel

    seen = {}
    real = kernel.HiddenMSEFunction.apply

    def spy(h_s, h_t, weight, bias, mask, store_r):
        seen.update(h_s=h_s.dtype, weight=weight.dtype)
        return real(h_s, h_t, weight, bias, mask, store_r)

    monkeypatch.setattr(kernel.HiddenMSEFunction, "apply", spy)
    h_s = rand((2, 17, 24), torch.float32, gen).requires_grad_()
    weight = rand((40, 24), torch.float32, gen, scale=0.2).requires_grad_()
    with torch.autocast("cuda", torch.bfloat16):
        out = losses.hidden_mse(h_s, rand((2, 17, 40), torch.bfloat16, gen), weight, None, None)
    out.backward()
    assert seen == {"h_s": torch.bfloat16, "weight": torch.bfloat16}
    assert h_s.grad.dtype == torch.float32 and weight.grad.dtype == torch.float32
