"""The public losses' edge cases (#15 item 11), on both paths: the torch references and the Triton kernels (the
interpreter on a CPU) take and refuse the same inputs, with a ValueError naming the argument."""

from __future__ import annotations

import pytest
import torch

from fastkd import losses
from tests.helpers import DEVICE

BACKENDS = ["torch", "triton"]


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    monkeypatch.setenv("FASTKD_BACKEND", request.param)
    return request.param


def _r(*shape, gen, dtype=torch.float32):
    return torch.randn(*shape, generator=gen).to(DEVICE, dtype)


def _hist(P, M, gen):
    h = torch.rand(P, M, generator=gen) + 0.1
    return (h / h.sum(1, keepdim=True)).to(DEVICE)


@pytest.mark.parametrize("eps", [-1.0, 0.0, float("nan"), 2.0, True])
def test_sinkhorn_eps_outside_0_1_is_refused(backend, gen, eps):
    """The torch path hung with eps=-1 and returned a NaN plan for eps=0 or NaN."""
    cost = torch.rand(2, 3, 4, generator=gen).to(DEVICE)
    with pytest.raises(ValueError, match=r"eps: expected a number in \(0, 1\]"):
        losses.sinkhorn(cost, _hist(2, 3, gen), _hist(2, 4, gen), eps=eps)


@pytest.mark.parametrize("iters", [0, -5, 2.7, True])
def test_sinkhorn_iters_must_be_a_positive_int(backend, gen, iters):
    cost = torch.rand(2, 3, 4, generator=gen).to(DEVICE)
    with pytest.raises(ValueError, match="iters: expected a positive int"):
        losses.sinkhorn(cost, _hist(2, 3, gen), _hist(2, 4, gen), iters=iters)


@pytest.mark.parametrize("bad", ["sums_to_2", "all_zero", "negative"])
@pytest.mark.parametrize("entry", ["sinkhorn", "emd_loss"])
def test_histograms_must_be_histograms(backend, gen, bad, entry):
    cost = torch.rand(2, 3, 4, generator=gen).to(DEVICE)
    a, b = _hist(2, 3, gen), _hist(2, 4, gen)
    a = {"sums_to_2": a * 2, "all_zero": torch.zeros_like(a), "negative": a - a.mean()}[bad]
    name = "a" if entry == "sinkhorn" else "w_s"  # emd_loss names its own arguments
    what = "sum to 1" if bad != "negative" else "non-negative"
    with pytest.raises(ValueError, match=rf"^{name}: expected .*{what}"):
        getattr(losses, entry)(cost, a, b)


@pytest.mark.parametrize("T", [float("inf"), True, 0.0, -1.0, float("nan")])
def test_soft_cross_entropy_temperature_is_a_finite_positive_number(backend, gen, T):
    x = _r(4, 3, gen=gen)
    with pytest.raises(ValueError, match="temperature: expected a finite positive number"):
        losses.soft_cross_entropy(x, x, T)


def test_soft_cross_entropy_needs_a_class(backend):
    """C = 0 returned -0.0."""
    x = torch.zeros(4, 0, device=DEVICE)
    with pytest.raises(ValueError, match="logits_s: expected a non-empty batch and at least one class"):
        losses.soft_cross_entropy(x, x)


@pytest.mark.parametrize("shape", [(0, 2, 5, 8), (2, 0, 5, 8)])
def test_attention_losses_refuse_an_empty_batch_or_head_count(backend, shape):
    """Empty B or H returned NaN."""
    q = torch.zeros(shape, device=DEVICE)
    for fn in (losses.attention_kl, losses.attention_mse):
        with pytest.raises(ValueError, match="q_s: expected a non-empty batch, head count"):
            fn(q, q, q, q)


@pytest.mark.parametrize("shape", [(0, 5, 8), (2, 0, 8), (2, 5, 0), (0, 2, 5, 8)])
def test_hidden_mse_refuses_empty_dims(backend, shape):
    h = torch.zeros(shape, device=DEVICE)
    with pytest.raises(ValueError, match="h_s: expected non-empty dims"):
        losses.hidden_mse(h, h)


def test_relation_kl_with_no_features_names_x_s(backend):
    """D = 0 named q_s (the split heads of the inner call)."""
    x = torch.zeros(2, 5, 0, device=DEVICE)
    with pytest.raises(ValueError, match="x_s: expected a non-empty"):
        losses.relation_kl(x, x, 1)


def test_a_nan_at_a_padded_position_is_ignored_on_both_paths(backend, gen):
    """The torch attention_kl, hidden_mse and layer_costs let a NaN at a padded token into their sums."""
    B, H, L, d = 2, 2, 7, 8
    mask = torch.ones(B, L, dtype=torch.bool, device=DEVICE)
    mask[1, 5:] = False
    q = [_r(B, H, L, d, gen=gen) for _ in range(4)]
    q_nan = [x.clone() for x in q]
    for x in q_nan:
        x[1, :, 6] = float("nan")
    h_s, h_t = _r(B, L, d, gen=gen), _r(B, L, d, gen=gen)
    h_nan = h_s.clone()
    h_nan[1, 6] = float("nan")
    for fn in (losses.attention_kl, losses.attention_mse):
        assert torch.equal(fn(*q_nan, mask), fn(*q, mask))
    assert torch.equal(losses.hidden_mse(h_nan, h_t, mask=mask), losses.hidden_mse(h_s, h_t, mask=mask))
    costs = losses.layer_costs(h_s=h_nan[None], h_t=h_t[None], mask=mask)[0]
    assert torch.isfinite(costs).all()


def test_a_mask_given_as_a_list_is_a_value_error(backend, gen):
    q = _r(1, 1, 3, 8, gen=gen)
    with pytest.raises(ValueError, match="mask: expected a torch.Tensor"):
        losses.attention_kl(q, q, q, q, [[1, 1, 0]])


def test_teacher_tensors_get_no_gradient_on_either_path(backend, gen):
    """The torch path gave a teacher tensor that required grad a gradient, the Triton path none: the rule is
    now none, on both."""
    q_s, k_s = (_r(2, 2, 5, 8, gen=gen).requires_grad_() for _ in range(2))
    q_t, k_t = (_r(2, 2, 5, 8, gen=gen).requires_grad_() for _ in range(2))
    losses.attention_kl(q_s, k_s, q_t, k_t).backward()
    assert q_s.grad is not None and q_t.grad is None and k_t.grad is None
    h_s, h_t = _r(2, 5, 8, gen=gen).requires_grad_(), _r(2, 5, 8, gen=gen).requires_grad_()
    losses.hidden_mse(h_s, h_t).backward()
    assert h_s.grad is not None and h_t.grad is None


def test_float64_inputs_are_computed_in_float64_on_both_paths(backend, gen):
    """The Triton path computed fp64 inputs in fp32 while the README promises fp64."""
    q = [_r(1, 2, 5, 8, gen=gen, dtype=torch.float64) for _ in range(4)]
    for fn in (losses.attention_kl, losses.attention_mse):
        assert fn(*q).dtype == torch.float64
    h = _r(2, 5, 8, gen=gen, dtype=torch.float64)
    assert losses.hidden_mse(h, h * 0.5).dtype == torch.float64


@pytest.mark.parametrize("P, M, N", [(0, 3, 4), (2, 0, 4), (2, 3, 0)])
def test_sinkhorn_refuses_an_empty_problem_the_same_on_both_paths(backend, gen, P, M, N):
    # The torch path raised RuntimeError/IndexError from inside the reference; the Triton path returned an
    # empty plan for P = 0 and a ValueError for M = 0.
    cost = torch.rand(P, M, N, generator=gen).to(DEVICE)
    a, b = torch.full((P, M), 1.0 / max(M, 1)).to(DEVICE), torch.full((P, N), 1.0 / max(N, 1)).to(DEVICE)
    with pytest.raises(ValueError, match=rf"cost: expected a non-empty batch of transport problems \[P, M, N\], got "
                                         rf"\({P}, {M}, {N}\)"):
        losses.sinkhorn(cost, a, b)
    with pytest.raises(ValueError, match="cost: expected a non-empty batch"):
        losses.emd_loss(cost, a, b)


@pytest.mark.parametrize("where", ["h_s", "h_t", "q_t", "k_s"])
def test_layer_costs_refuse_nan_at_a_valid_position(gen, where):
    # A NaN teacher hidden state came out as NaN costs with no word, where hidden_mse refuses the same input.
    x = {"h_s": _r(2, 3, 5, 8, gen=gen), "h_t": _r(4, 3, 5, 8, gen=gen), "q_s": _r(2, 3, 2, 5, 4, gen=gen),
         "k_s": _r(2, 3, 2, 5, 4, gen=gen), "q_t": _r(4, 3, 2, 5, 4, gen=gen), "k_t": _r(4, 3, 2, 5, 4, gen=gen)}
    mask = torch.ones(3, 5, dtype=torch.bool, device=DEVICE)
    mask[2, 3:] = False
    pad = x[where].clone()
    pad[(0, 2, 4) if where.startswith("h") else (0, 2, 1, 4)] = float("nan")  # a padded position: ignored
    hidden, attention = losses.layer_costs(**{**x, where: pad}, mask=mask)
    assert torch.isfinite(hidden).all() and torch.isfinite(attention).all()
    bad = x[where].clone()
    bad[(1, 0, 2) if where.startswith("h") else (1, 0, 1, 2)] = float("nan")
    with pytest.raises(ValueError, match=rf"{where}: expected finite values at valid \(unmasked\) positions"):
        losses.layer_costs(**{**x, where: bad}, mask=mask)


@pytest.mark.parametrize("side", ["h_s", "h_t"])
def test_pkd_mse_refuses_a_zero_vector(backend, gen, side):
    # A zero student [CLS] returned 0.9999999 (F.normalize's eps) with a gradient of order 1e12, and no word.
    h = {"h_s": _r(3, 8, gen=gen), "h_t": _r(3, 8, gen=gen)}
    h[side][1] = 0.0
    with pytest.raises(ValueError, match=rf"{side}: expected vectors with a direction; found the zero vector"):
        losses.pkd_mse(**h)
    from fastkd.losses.checks import value_checks

    with value_checks(False):  # the documented eps rule with the checks off: the zero vector's term is 1
        loss = losses.pkd_mse(**h)
    unit = {k: torch.nn.functional.normalize(v.double(), dim=-1) for k, v in h.items()}
    others = (unit["h_s"] - unit["h_t"]).square().sum(-1)[[0, 2]].sum()
    assert abs(float(loss) * 3 - float(others) - 1.0) < 1e-5
