"""Batched Sinkhorn kernel (fastkd.kernels.sinkhorn) and BERT-EMD weight update (fastkd.losses.emd).

Through TRITON_INTERPRET=1 on the CPU. Tolerances: plans vs the float64 reference ‖·‖/‖ref‖ < 1e-3 (fp32 math
inside, tol 1e-5 vs 1e-6: measured ~2e-5); transport cost within 1% of the exact LP (scipy HiGHS); marginals
after rounding within 1e-5 absolute (fp32) or 1% relative of the largest mass (fp16/bf16 plans).
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from fastkd.kernels.sinkhorn import DEFAULT_TOL, sinkhorn, sinkhorn_with_info  # noqa: E402

from fastkd import losses  # noqa: E402
from fastkd.losses import reference as ref  # noqa: E402
from fastkd.losses.emd import update_layer_weights  # noqa: E402
from tests.helpers import DEVICE, exact_emd, rel_err  # noqa: E402

pytestmark = pytest.mark.usefixtures("triton_backend")


def _histograms(P, n, gen):
    h = torch.rand(P, n, generator=gen, dtype=torch.float64) + 0.1
    return h / h.sum(1, keepdim=True)


def _problems(P, M, N, gen, scale=5.0):
    cost = torch.rand(P, M, N, generator=gen, dtype=torch.float64) * scale
    return cost, _histograms(P, M, gen), _histograms(P, N, gen)


def _check_marginals(plan, a, b, atol):
    plan = plan.double().cpu()
    assert (plan >= 0).all()
    assert torch.allclose(plan.sum(2), a.cpu(), atol=atol, rtol=0), (plan.sum(2) - a.cpu()).abs().max()
    assert torch.allclose(plan.sum(1), b.cpu(), atol=atol, rtol=0), (plan.sum(1) - b.cpu()).abs().max()


@pytest.mark.parametrize("M, N", [(3, 6), (4, 12), (12, 24), (24, 24)])
def test_batched_plans_match_reference_and_exact_emd(M, N, gen):
    P = 2  # several problems in one launch
    cost, a, b = _problems(P, M, N, gen)
    plan, n_iters, _ = sinkhorn_with_info(cost.float().to(DEVICE), a.float().to(DEVICE), b.float().to(DEVICE))
    assert plan.dtype == torch.float32 and plan.shape == (P, M, N)
    _check_marginals(plan, a, b, atol=1e-5)
    expected = ref.sinkhorn(cost.float().double(), a, b)
    assert rel_err(plan.cpu(), expected) < 1e-3
    for p in range(P):
        exact = exact_emd(cost[p].float().double(), a[p], b[p])
        got = float((plan[p].cpu().double() * cost[p].float().double()).sum())
        assert abs(got - exact) / exact < 0.01, (p, got, exact)
    assert (n_iters >= 1).all() and (n_iters <= ref.DEFAULT_SINKHORN_ITERS).all()


def test_each_problem_stops_on_its_own_and_iters_bounds_the_total(gen):
    # An easy problem (cost = a constant + tiny noise -> near the product plan) beside a hard random one.
    cost, a, b = _problems(2, 4, 12, gen)
    cost[0] = 1.0 + 1e-3 * cost[0]
    args = (cost.float().to(DEVICE), a.float().to(DEVICE), b.float().to(DEVICE))
    _, n_iters, err = sinkhorn_with_info(*args)
    assert n_iters[0] < n_iters[1] <= ref.DEFAULT_SINKHORN_ITERS
    assert err[0] < DEFAULT_TOL
    plan, n_iters, _ = sinkhorn_with_info(*args, iters=40)
    assert (n_iters <= 40).all()
    _check_marginals(plan, a, b, atol=1e-5)  # rounding makes the marginals exact even when stopped early


def test_degenerate_problems_in_one_launch(gen):
    M, N = 3, 6
    cost, a, b = _problems(6, M, N, gen)
    cost[0] = 0.0  # zero cost: any feasible plan is optimal; must stay finite
    a[1] = torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64)  # one-hot student histogram
    b[2] = 0.0
    b[2, 4] = 1.0  # one-hot teacher histogram
    cost[3] *= 1e4 / 5  # large cost magnitudes
    cost[4] *= 1e-6 / 5  # tiny ones
    a[5, 0], b[5, 5] = 0.0, 0.0  # zero-mass entries in an otherwise ordinary problem
    a[5], b[5] = a[5] / a[5].sum(), b[5] / b[5].sum()
    plan = sinkhorn(cost.float().to(DEVICE), a.float().to(DEVICE), b.float().to(DEVICE)).cpu()
    assert torch.isfinite(plan).all()
    _check_marginals(plan, a, b, atol=1e-5)
    assert torch.allclose(plan[1], b[1].float()[None, :] * a[1].float()[:, None], atol=1e-6)  # forced plan
    assert torch.allclose(plan[2], a[2].float()[:, None] * b[2].float()[None, :], atol=1e-6)
    assert plan[5, 0].abs().max() == 0 and plan[5, :, 5].abs().max() == 0
    for p in range(1, 6):
        exact = exact_emd(cost[p].float().double(), a[p], b[p])
        got = float((plan[p].double() * cost[p].float().double()).sum())
        assert abs(got - exact) <= 0.01 * abs(exact) + 1e-12 * float(cost[p].abs().max()), (p, got, exact)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_costs(dtype, gen):
    cost, a, b = _problems(2, 3, 7, gen)
    cost_h, a_h, b_h = cost.to(dtype), a.to(dtype), b.to(dtype)
    plan = sinkhorn(cost_h.to(DEVICE), a_h.to(DEVICE), b_h.to(DEVICE)).cpu()
    assert plan.dtype == dtype
    # Marginals are exact in fp32 before the final cast; the cast and the rounded inputs cost ~1% of a mass.
    _check_marginals(plan, a_h.double(), b_h.double(), atol=0.01 * float(max(a.max(), b.max())))
    # The rounded histograms no longer have equal sums, which the float64 reference does not tolerate: give it
    # the renormalised ones.
    a_r, b_r = a_h.double() / a_h.double().sum(1, keepdim=True), b_h.double() / b_h.double().sum(1, keepdim=True)
    expected = ref.sinkhorn(cost_h.double(), a_r, b_r)
    assert rel_err(plan, expected) < (1e-2 if dtype == torch.bfloat16 else 2e-3)
    for p in range(2):
        exact = exact_emd(cost_h[p].double(), a[p], b[p])
        got = float((plan[p].double() * cost_h[p].double()).sum())
        assert abs(got - exact) / exact < 0.01


def test_non_contiguous_inputs(gen):
    cost, a, b = _problems(2, 5, 7, gen)
    cost_nc = cost.float().transpose(1, 2).contiguous().transpose(1, 2)  # strides (35, 1, 5)
    a_nc = torch.stack([a.float(), a.float()], dim=2)[:, :, 0]  # stride 2 along M
    b_nc = b.float().t().contiguous().t()
    assert not (cost_nc.is_contiguous() or a_nc.is_contiguous() or b_nc.is_contiguous())
    out = sinkhorn(cost_nc.to(DEVICE), a_nc.to(DEVICE), b_nc.to(DEVICE), iters=60).cpu()
    expected = sinkhorn(cost.float().contiguous().to(DEVICE), a.float().to(DEVICE), b.float().to(DEVICE),
                        iters=60).cpu()
    assert torch.equal(out, expected)


def test_emd_loss_through_the_kernel_has_the_plan_as_gradient(gen):
    cost, a, b = _problems(2, 3, 6, gen)
    cost = cost.float().to(DEVICE).requires_grad_()
    loss, plan = losses.emd_loss(cost, a.float().to(DEVICE), b.float().to(DEVICE))
    assert not plan.requires_grad
    assert torch.allclose(loss, (plan * cost).sum((1, 2)))
    loss.sum().backward()
    assert torch.equal(cost.grad, plan)
    for p in range(2):
        exact = exact_emd(cost[p].detach().double().cpu(), a[p], b[p])
        assert abs(float(loss[p].detach()) - exact) / exact < 0.01


def test_float64_goes_to_the_reference(gen, monkeypatch):
    monkeypatch.setenv("FASTKD_BACKEND", "triton")  # the public entry routes float64 away from the kernel
    cost, a, b = _problems(2, 3, 6, gen)
    plan = losses.sinkhorn(cost.to(DEVICE), a.to(DEVICE), b.to(DEVICE))
    assert plan.dtype == torch.float64
    assert rel_err(plan.cpu(), ref.sinkhorn(cost, a, b)) < 1e-9


@pytest.mark.parametrize("kwargs, name", [
    (dict(cost=torch.rand(2, 3)), "cost"),
    (dict(a=torch.rand(2, 4)), "a"),
    (dict(b=torch.rand(3, 6)), "b"),
    (dict(cost=torch.rand(2, 3, 6, dtype=torch.float32).masked_fill(torch.eye(3, 6, dtype=torch.bool), float("nan"))),
     "cost"),
    (dict(a=torch.full((2, 3), -1 / 3)), "a"),
    (dict(eps=0.0), "eps"),
    (dict(iters=0), "iters"),
    (dict(cost=torch.rand(1, 3, 200), a=torch.full((1, 3), 1 / 3), b=torch.full((1, 200), 1 / 200)), "cost"),
])
def test_bad_input_raises_value_error_naming_the_argument(kwargs, name, monkeypatch):
    # Checked once, by the public entry, before the kernel launches (the kernel adds only its size limit).
    monkeypatch.setenv("FASTKD_BACKEND", "triton")
    args = dict(cost=torch.rand(2, 3, 6), a=torch.full((2, 3), 1 / 3), b=torch.full((2, 6), 1 / 6))
    args.update(kwargs)
    with pytest.raises(ValueError, match=f"^{name}:"):
        losses.sinkhorn(**args)


# ---------------------------------------------------------------- BERT-EMD layer-weight update


def _loop_update(plan, cost, w_s, w_t):
    """BERT-EMD's get_new_layer_weight, element by element (float64, one problem)."""
    def side(trans_weight, w):
        w = [float(trans_weight[i]) / float(w[i]) for i in range(len(w))]
        total = sum(w)
        w = [total / x if x != 0 else 0.0 for x in w]
        return torch.tensor(w, dtype=torch.float64) / sum(w)
    paid = plan.double() * cost.double()
    return side(paid.sum(1), w_s), side(paid.sum(0), w_t)


def test_update_layer_weights_matches_the_papers_loop(gen):
    P, M, N = 3, 4, 12
    cost, w_s, w_t = _problems(P, M, N, gen)
    plan = ref.sinkhorn(cost, w_s, w_t)
    new_s, new_t = update_layer_weights(plan, cost, w_s, w_t)
    for p in range(P):
        exp_s, exp_t = _loop_update(plan[p], cost[p], w_s[p], w_t[p])
        assert torch.allclose(new_s[p], exp_s, rtol=1e-10) and torch.allclose(new_t[p], exp_t, rtol=1e-10)
    assert torch.allclose(new_s.sum(1), torch.ones(P, dtype=torch.float64))
    # Unbatched, float32: same numbers.
    s32, t32 = update_layer_weights(plan[0].float(), cost[0].float(), w_s[0].float(), w_t[0].float())
    assert s32.dtype == torch.float32 and torch.allclose(s32.double(), new_s[0], rtol=1e-5)
    assert torch.allclose(t32.double(), new_t[0], rtol=1e-5)


def test_update_layer_weights_degenerate_costs_stay_finite(gen):
    M, N = 3, 6
    w_s, w_t = torch.full((M,), 1 / M), torch.full((N,), 1 / N)
    plan = w_s[:, None] * w_t[None, :]
    s, t = update_layer_weights(plan, torch.zeros(M, N), w_s, w_t)  # nothing paid: weights kept
    assert torch.equal(s, w_s) and torch.equal(t, w_t)
    cost = torch.rand(M, N, generator=gen) + 0.5
    cost[1] = 0.0  # student layer 1 paid nothing: weight 0, as in BERT-EMD's code
    s, t = update_layer_weights(plan, cost, w_s, w_t)
    assert torch.isfinite(s).all() and torch.isfinite(t).all() and s[1] == 0
    assert torch.allclose(s.sum(), torch.tensor(1.0)) and torch.allclose(t.sum(), torch.tensor(1.0))
    # Cheaper layers gain weight.
    assert s[torch.tensor([0, 2])][(cost[[0, 2]] * plan[[0, 2]]).sum(1).argmin()] == s[[0, 2]].max()


def test_update_layer_weights_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="^w_t:"):
        update_layer_weights(torch.rand(3, 4), torch.rand(3, 4), torch.rand(3), torch.rand(5))
    with pytest.raises(ValueError, match="^cost:"):
        update_layer_weights(torch.rand(3, 4), torch.rand(4, 3), torch.rand(3), torch.rand(4))
