"""fastkd.losses (reference path) against straightforward float64 implementations written here.

The float64 versions loop over sequences and keep only each sequence's valid tokens, so they share no code
(and no masking trick) with fastkd. Half-precision inputs are compared with float64 math on the same rounded
values, so the only error left is fastkd's fp32 accumulation: tolerance 1e-5 (‖out − ref‖/‖ref‖) everywhere.
"""


import pytest
import torch

from fastkd import losses
from tests.helpers import attention_kl_f64, attention_mse_f64, exact_emd, make_mask, rel_err, valid_idx

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOL = 1e-5


def qk(B, H, L, d, dtype, gen, scale=1.0, grad=False):
    x = (torch.randn(B, H, L, d, generator=gen) * scale).to(dtype)
    return x.requires_grad_(grad)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mask_kind", ["none", "prefix", "single", "holes"])
@pytest.mark.parametrize("name", ["attention_mse", "attention_kl"])
def test_attention_losses_match_float64(name, mask_kind, dtype, gen):
    B, H, L, d_s, d_t = 3, 2, 7, 8, 16  # student and teacher head dims differ
    q_s, k_s = qk(B, H, L, d_s, dtype, gen, grad=True), qk(B, H, L, d_s, dtype, gen, grad=True)
    q_t, k_t = qk(B, H, L, d_t, dtype, gen), qk(B, H, L, d_t, dtype, gen)
    mask = make_mask(mask_kind, B, L, gen)
    out = getattr(losses, name)(q_s, k_s, q_t, k_t, mask)
    assert out.dtype == torch.float32 and out.dim() == 0
    naive = {"attention_mse": attention_mse_f64, "attention_kl": attention_kl_f64}[name]
    q64, k64 = q_s.detach().double().requires_grad_(), k_s.detach().double().requires_grad_()
    ref = naive(q64, k64, q_t, k_t, mask)
    assert rel_err(out, ref) < TOL
    out.backward()
    ref.backward()
    gtol = TOL if dtype == torch.float32 else 1e-2  # half grads are rounded to dtype
    assert rel_err(q_s.grad, q64.grad) < gtol
    assert rel_err(k_s.grad, k64.grad) < gtol
    assert q_s.grad.dtype == dtype


def test_attention_kl_large_logits_stays_finite(gen):
    B, H, L, d = 2, 2, 9, 8
    q_s, k_s = qk(B, H, L, d, torch.float32, gen, 30.0, True), qk(B, H, L, d, torch.float32, gen, 30.0, True)
    q_t, k_t = qk(B, H, L, d, torch.float32, gen, 30.0), qk(B, H, L, d, torch.float32, gen, 30.0)
    mask = make_mask("prefix", B, L, gen)
    out = losses.attention_kl(q_s, k_s, q_t, k_t, mask)
    ref = attention_kl_f64(q_s.detach(), k_s.detach(), q_t, k_t, mask)
    assert torch.isfinite(out) and rel_err(out, ref) < TOL
    out.backward()
    assert torch.isfinite(q_s.grad).all()


def test_attention_kl_is_zero_for_identical_maps(gen):
    q, k = qk(2, 3, 5, 4, torch.float32, gen), qk(2, 3, 5, 4, torch.float32, gen)
    assert abs(float(losses.attention_kl(q, k, q, k))) < 1e-6
    assert float(losses.attention_kl(q, k, q * 2, k)) > 1e-3


@pytest.mark.parametrize("dtype", DTYPES)
def test_relation_kl_matches_float64(dtype, gen):
    B, L, D_s, D_t, R = 2, 6, 12, 24, 3
    x_s = torch.randn(B, L, D_s, generator=gen).to(dtype).requires_grad_()
    x_t = torch.randn(B, L, D_t, generator=gen).to(dtype)
    mask = make_mask("prefix", B, L, gen)
    out = losses.relation_kl(x_s, x_t, R, mask)
    x64 = x_s.detach().double().requires_grad_()
    rs = x64.view(B, L, R, D_s // R).transpose(1, 2)
    rt = x_t.double().view(B, L, R, D_t // R).transpose(1, 2)
    ref = attention_kl_f64(rs, rs, rt, rt, mask)
    assert rel_err(out, ref) < TOL
    out.backward()
    ref.backward()
    assert rel_err(x_s.grad, x64.grad) < (TOL if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layered", [False, True])
@pytest.mark.parametrize("mask_kind", ["none", "single"])
def test_hidden_mse_matches_float64(dtype, layered, mask_kind, gen):
    K, B, L, d_s, d_t = 3, 2, 5, 6, 10
    lead = (K,) if layered else ()
    h_s = torch.randn(*lead, B, L, d_s, generator=gen).to(dtype).requires_grad_()
    h_t = torch.randn(*lead, B, L, d_t, generator=gen).to(dtype)
    w = torch.randn(*lead, d_t, d_s, generator=gen).to(dtype).requires_grad_()
    bias = torch.randn(*lead, d_t, generator=gen).to(dtype).requires_grad_()
    mask = make_mask(mask_kind, B, L, gen)
    out = losses.hidden_mse(h_s, h_t, w, bias, mask)
    h64, w64, b64 = (t.detach().double().requires_grad_() for t in (h_s, w, bias))
    per_pair = []
    for k in range(K if layered else 1):
        hs = h64[k] if layered else h64
        ht = (h_t[k] if layered else h_t).double()
        wk, bk = (w64[k], b64[k]) if layered else (w64, b64)
        rows = [((hs[b, valid_idx(mask, b, L)] @ wk.T + bk - ht[b, valid_idx(mask, b, L)]) ** 2)
                for b in range(B)]
        per_pair.append(torch.cat(rows).mean())
    ref = torch.stack(per_pair).mean()
    assert rel_err(out, ref) < TOL
    out.backward()
    ref.backward()
    tol = TOL if dtype == torch.float32 else 1e-2
    for got, want in ((h_s.grad, h64.grad), (w.grad, w64.grad), (bias.grad, b64.grad)):
        assert rel_err(got, want) < tol


def test_hidden_mse_without_projection(gen):
    h_s = torch.randn(2, 3, 4, generator=gen, requires_grad=True)
    h_t = torch.randn(2, 3, 4, generator=gen)
    assert rel_err(losses.hidden_mse(h_s, h_t), ((h_s.double() - h_t.double()) ** 2).mean()) < TOL


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(5, 8), (3, 5, 8)])
def test_pkd_mse_matches_float64(dtype, shape, gen):
    h_s = torch.randn(*shape, generator=gen).to(dtype).requires_grad_()
    h_t = torch.randn(*shape, generator=gen).to(dtype)
    out = losses.pkd_mse(h_s, h_t)
    s, t = h_s.double(), h_t.double()
    per = ((s / s.norm(dim=-1, keepdim=True) - t / t.norm(dim=-1, keepdim=True)) ** 2).sum(-1)
    ref = per.mean(-1).sum() if len(shape) == 3 else per.mean()
    assert rel_err(out, ref) < TOL


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T", [1.0, 4.0])
def test_soft_cross_entropy_matches_float64(dtype, T, gen):
    s = (torch.randn(6, 5, generator=gen) * 20).to(dtype).requires_grad_()  # large logits
    t = (torch.randn(6, 5, generator=gen) * 20).to(dtype)
    out = losses.soft_cross_entropy(s, t, T)
    ref = -(torch.softmax(t.double() / T, -1) * torch.log_softmax(s.double() / T, -1)).sum(-1).mean()
    assert rel_err(out, ref) < TOL
    out.backward()
    assert torch.isfinite(s.grad).all()


# ---------------------------------------------------------------- bad input


def _qk4(*shape):
    return torch.randn(*shape)


@pytest.mark.parametrize(
    "args, match",
    [
        ((_qk4(2, 3, 5, 4), _qk4(2, 3, 5, 4), _qk4(2, 4, 5, 4), _qk4(2, 4, 5, 4)), "q_t: expected 3 heads"),
        ((_qk4(2, 3, 5, 4), _qk4(2, 3, 6, 4), _qk4(2, 3, 5, 4), _qk4(2, 3, 5, 4)), "k_s: expected the shape"),
        ((_qk4(2, 3, 5, 4), _qk4(2, 3, 5, 4), _qk4(2, 3, 6, 4), _qk4(2, 3, 6, 4)), "q_t: expected batch 2"),
        ((_qk4(3, 5, 4), _qk4(2, 3, 5, 4), _qk4(2, 3, 5, 4), _qk4(2, 3, 5, 4)), r"q_s: expected shape \[B, H"),
        ((torch.ones(2, 3, 5, 4, dtype=torch.int64), _qk4(2, 3, 5, 4), _qk4(2, 3, 5, 4), _qk4(2, 3, 5, 4)),
         "q_s: expected a floating dtype"),
    ],
)
@pytest.mark.parametrize("fn", [losses.attention_mse, losses.attention_kl])
def test_attention_bad_input_names_argument(fn, args, match):
    with pytest.raises(ValueError, match=match):
        fn(*args)


@pytest.mark.parametrize(
    "mask, match",
    [
        (torch.ones(2, 4, dtype=torch.bool), r"mask: expected shape \[B, L\] = \[2, 5\]"),
        (torch.tensor([[1, 1, 0, 0, 0], [0, 0, 0, 0, 0]]), "mask: every sequence needs at least one valid"),
        (torch.full((2, 5), 2), "mask: expected bool or 0/1"),
    ],
)
def test_bad_mask_names_argument(mask, match):
    q = torch.randn(2, 3, 5, 4)
    with pytest.raises(ValueError, match=match):
        losses.attention_kl(q, q, q, q, mask)


def test_integer_01_mask_equals_bool_mask(gen):
    q, k = qk(2, 2, 5, 4, torch.float32, gen), qk(2, 2, 5, 4, torch.float32, gen)
    q2 = qk(2, 2, 5, 4, torch.float32, gen)
    m = torch.tensor([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0]])
    assert float(losses.attention_kl(q, k, q2, k, m)) == float(losses.attention_kl(q, k, q2, k, m.bool()))


def test_other_bad_inputs():
    with pytest.raises(ValueError, match="weight: needed because h_s has 4 features"):
        losses.hidden_mse(torch.randn(2, 3, 4), torch.randn(2, 3, 6))
    with pytest.raises(ValueError, match=r"weight: expected shape \[6, 4\]"):
        losses.hidden_mse(torch.randn(2, 3, 4), torch.randn(2, 3, 6), torch.randn(4, 6))
    with pytest.raises(ValueError, match=r"bias: expected shape \[6\]"):
        losses.hidden_mse(torch.randn(2, 3, 4), torch.randn(2, 3, 6), torch.randn(6, 4), torch.randn(4))
    with pytest.raises(ValueError, match="h_t: expected leading dims"):
        losses.hidden_mse(torch.randn(2, 3, 4), torch.randn(2, 2, 4))
    with pytest.raises(ValueError, match="num_heads: x_s's feature size 10"):
        losses.relation_kl(torch.randn(2, 3, 10), torch.randn(2, 3, 12), 4)
    with pytest.raises(ValueError, match="h_t: expected shape"):
        losses.pkd_mse(torch.randn(3, 4), torch.randn(3, 5))
    with pytest.raises(ValueError, match="logits_t: expected shape"):
        losses.soft_cross_entropy(torch.randn(3, 4), torch.randn(3, 5))
    with pytest.raises(ValueError, match="temperature: expected a finite positive"):
        losses.soft_cross_entropy(torch.randn(3, 4), torch.randn(3, 4), 0.0)
    with pytest.raises(ValueError, match=r"w_t: expected shape \[P, N\]"):
        losses.emd_loss(torch.rand(2, 3, 4), torch.full((2, 3), 1 / 3), torch.full((2, 5), 0.2))
    if torch.device("meta") is not None:  # a meta tensor has no values: refused, named (a RuntimeError before)
        with pytest.raises(ValueError, match="k_t: expected a tensor with data, got a meta tensor"):
            q = torch.randn(1, 1, 2, 2)
            losses.attention_mse(q, q, q, q.to("meta"))


# ---------------------------------------------------------------- Sinkhorn / EMD reference


@pytest.mark.parametrize("M, N", [(3, 6), (4, 12), (6, 12), (12, 24), (24, 24)])
def test_reference_sinkhorn_is_within_one_percent_of_exact_emd(M, N, gen):
    P = 3
    cost = torch.rand(P, M, N, generator=gen, dtype=torch.float64) * 5
    a = torch.rand(P, M, generator=gen, dtype=torch.float64) + 0.1
    b = torch.rand(P, N, generator=gen, dtype=torch.float64) + 0.1
    a, b = a / a.sum(1, keepdim=True), b / b.sum(1, keepdim=True)
    loss, plan = losses.emd_loss(cost, a, b)
    assert torch.allclose(plan.sum(2), a, atol=1e-5) and torch.allclose(plan.sum(1), b, atol=1e-5)
    for p in range(P):
        exact = exact_emd(cost[p], a[p], b[p])
        assert abs(float(loss[p]) - exact) / exact < 0.01


def test_emd_loss_gradient_is_the_plan(gen):
    cost = torch.rand(2, 3, 4, generator=gen, requires_grad=True)
    a, b = torch.full((2, 3), 1 / 3), torch.full((2, 4), 0.25)
    loss, plan = losses.emd_loss(cost, a, b)
    loss.sum().backward()
    assert torch.allclose(cost.grad, plan)


@pytest.mark.parametrize("mask_kind", ["none", "prefix", "holes"])
@pytest.mark.parametrize("name", ["attention_mse", "attention_kl"])
def test_score_map_losses_match_float64(name, mask_kind, gen):
    # The real-score path (DeBERTa, MPNet): on maps q·kᵀ/√d the loss equals the independent float64 of the Q/K
    # form; a teacher map with a bias Q and K could not give changes it, and the student's grads flow.
    B, H, L, d = 3, 2, 7, 8
    q_s, k_s = qk(B, H, L, d, torch.float32, gen, grad=True), qk(B, H, L, d, torch.float32, gen, grad=True)
    q_t, k_t = qk(B, H, L, d, torch.float32, gen), qk(B, H, L, d, torch.float32, gen)
    mask = make_mask(mask_kind, B, L, gen)
    s_s, s_t = losses.attention_scores(q_s, k_s), losses.attention_scores(q_t, k_t)
    s_t = s_t + torch.randn(B, H, L, L, generator=gen)  # a bias Q and K alone could not give
    out = getattr(losses, f"{name}_maps")(s_s, s_t, mask)
    naive = {"attention_mse": attention_mse_f64, "attention_kl": attention_kl_f64}[name]
    unbiased = getattr(losses, f"{name}_maps")(s_s, losses.attention_scores(q_t, k_t), mask)
    assert rel_err(unbiased, naive(q_s.double(), k_s.double(), q_t, k_t, mask)) < TOL
    assert torch.isfinite(out) and float(out) != float(unbiased)
    out.backward()
    assert q_s.grad is not None and torch.isfinite(q_s.grad).all()


def test_score_map_bad_input_names_argument(gen):
    s = torch.randn(2, 2, 5, 5, generator=gen)
    with pytest.raises(ValueError, match=r"s_s: expected non-empty square score maps \[B, H, L, L\]"):
        losses.attention_mse_maps(s[..., :4], s[..., :4])
    with pytest.raises(ValueError, match=r"s_t: expected the shape of s_s \(2, 2, 5, 5\)"):
        losses.attention_kl_maps(s, s[:, :1])
    with pytest.raises(ValueError, match="s_t"):
        losses.attention_kl_maps(s, s.clone().fill_(float("nan")))
