"""Property-based checks of every public loss on both paths (#15): hypothesis draws shapes, dtypes, masks and
scales (derandomized: a fixed seed, and a fixed budget that fits CI); valid inputs must match float64
implementations written here, and invalid ones must raise the same ValueError, naming the argument, on the torch
and the Triton path (the interpreter on a CPU)."""

from __future__ import annotations

import math
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastkd import losses
from tests.helpers import DEVICE, attention_kl_f64, attention_mse_f64, hidden_mse_f64, rel_err

BUDGET = settings(max_examples=int(os.environ.get("FASTKD_PROPERTY_EXAMPLES", "20")), deadline=None,
                  derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
TOL = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}  # ‖out − ref‖/‖ref‖ of the loss value


def _both(fn, monkeypatch):
    """fn() on the torch and on the Triton path: (torch result, triton result), or the ValueError each raised."""
    out = []
    for backend in ("torch", "triton"):
        monkeypatch.setenv("FASTKD_BACKEND", backend)
        try:
            out.append(fn())
        except ValueError as e:
            out.append(e)
    monkeypatch.delenv("FASTKD_BACKEND")
    return out


@st.composite
def batches(draw, d_choices=(4, 8, 12, 16)):
    B, L = draw(st.integers(1, 3)), draw(st.integers(1, 9))
    lengths = [draw(st.integers(1, L)) for _ in range(B)]
    mask = None if draw(st.booleans()) else torch.arange(L)[None] < torch.tensor(lengths)[:, None]
    return {"B": B, "L": L, "H": draw(st.integers(1, 2)), "d_s": draw(st.sampled_from(d_choices)),
            "d_t": draw(st.sampled_from(d_choices)), "mask": mask, "seed": draw(st.integers(0, 2**31 - 1)),
            "dtype": DTYPES[draw(st.sampled_from(sorted(DTYPES)))], "scale": draw(st.sampled_from([0.5, 1.0, 4.0]))}


def _randn(x, *shape):
    g = torch.Generator().manual_seed(x["seed"] + len(shape) * 7919 + sum(shape))
    return (torch.randn(*shape, generator=g) * x["scale"]).to(DEVICE, x["dtype"])


def _transport_problem(P: int, M: int, N: int, seed: int, scale: float):
    """P random transport problems: costs in [0, scale) and two positive histograms summing to 1 each."""
    g = torch.Generator().manual_seed(seed)
    cost = (torch.rand(P, M, N, generator=g) * scale).to(DEVICE)
    a, b = torch.rand(P, M, generator=g) + 0.1, torch.rand(P, N, generator=g) + 0.1
    return cost, (a / a.sum(1, keepdim=True)).to(DEVICE), (b / b.sum(1, keepdim=True)).to(DEVICE)


def _close(out, ref, dtype):
    assert torch.isfinite(out)
    assert rel_err(out.cpu(), ref) < TOL[dtype] or abs(float(out) - float(ref)) < 1e-4, (float(out), float(ref))


@pytest.mark.parametrize("name", ["attention_kl", "attention_mse"])
@BUDGET
@given(x=batches())
def test_attention_losses_match_float64_on_both_paths(monkeypatch, name, x):
    B, H, L = x["B"], x["H"], x["L"]
    q_s, k_s = _randn(x, B, H, L, x["d_s"]), _randn(x, B, H, L, x["d_s"]).flip(2)
    q_t, k_t = _randn(x, B, H, L, x["d_t"]), _randn(x, B, H, L, x["d_t"]).flip(1)
    mask = None if x["mask"] is None else x["mask"].to(DEVICE)
    ref = {"attention_kl": attention_kl_f64, "attention_mse": attention_mse_f64}[name](q_s, k_s, q_t, k_t, mask)
    for out in _both(lambda: getattr(losses, name)(q_s, k_s, q_t, k_t, mask), monkeypatch):
        _close(out, ref, x["dtype"])


@BUDGET
@given(x=batches())
def test_hidden_mse_matches_float64_on_both_paths(monkeypatch, x):
    B, L = x["B"], x["L"]
    h_s, h_t = _randn(x, B, L, x["d_s"]), _randn(x, B, L, x["d_t"])
    w, b = _randn(x, x["d_t"], x["d_s"]) / math.sqrt(x["d_s"]), _randn(x, x["d_t"])
    mask = None if x["mask"] is None else x["mask"].to(DEVICE)
    ref = hidden_mse_f64(h_s, h_t, w, b, mask)
    for out in _both(lambda: losses.hidden_mse(h_s, h_t, w, b, mask), monkeypatch):
        _close(out, ref, x["dtype"])


@BUDGET
@given(x=batches(d_choices=(4, 8)), heads=st.sampled_from([1, 2, 4]))
def test_relation_kl_matches_float64_on_both_paths(monkeypatch, x, heads):
    B, L = x["B"], x["L"]
    x_s, x_t = _randn(x, B, L, 8), _randn(x, B, L, 16)
    mask = None if x["mask"] is None else x["mask"].to(DEVICE)

    def split(v):  # [B, L, D] -> [B, heads, L, D/heads]
        return v.double().reshape(B, L, heads, -1).transpose(1, 2)

    ref = attention_kl_f64(split(x_s), split(x_s), split(x_t), split(x_t), mask)
    for out in _both(lambda: losses.relation_kl(x_s, x_t, heads, mask), monkeypatch):
        _close(out, ref, x["dtype"])


@BUDGET
@given(x=batches(), K=st.integers(1, 3), T=st.sampled_from([0.5, 1.0, 4.0]))
def test_pkd_and_soft_cross_entropy_match_float64_on_both_paths(monkeypatch, x, K, T):
    h_s, h_t = _randn(x, K, x["B"], x["d_s"]), _randn(x, K, x["B"], x["d_s"]).flip(-1)
    n_s, n_t = (h / h.norm(dim=-1, keepdim=True) for h in (h_s.double(), h_t.double()))
    pkd_ref = ((n_s - n_t) ** 2).sum(-1).mean(-1).sum()
    for out in _both(lambda: losses.pkd_mse(h_s, h_t), monkeypatch):
        _close(out, pkd_ref, x["dtype"])
    s, t = _randn(x, x["B"], x["d_t"]), _randn(x, x["B"], x["d_t"]).flip(0)
    ce_ref = -(torch.softmax(t.double() / T, -1) * torch.log_softmax(s.double() / T, -1)).sum(-1).mean()
    for out in _both(lambda: losses.soft_cross_entropy(s, t, T), monkeypatch):
        _close(out, ce_ref, x["dtype"])


@BUDGET
@given(P=st.integers(1, 3), M=st.integers(1, 6), N=st.integers(1, 7), seed=st.integers(0, 2**31 - 1))
def test_sinkhorn_plans_have_the_marginals_on_both_paths(monkeypatch, P, M, N, seed):
    cost, a, b = _transport_problem(P, M, N, seed, 3.0)
    plans = _both(lambda: losses.sinkhorn(cost, a, b), monkeypatch)
    for plan in plans:
        assert torch.allclose(plan.sum(2).double(), a.double(), atol=2e-3)
        assert torch.allclose(plan.sum(1).double(), b.double(), atol=2e-3)
    assert rel_err(plans[1].cpu(), plans[0].cpu()) < 2e-2


# ---------------------------------------------------------------- invalid inputs: the same refusal on both paths

BREAKS = ["nan_student", "inf_teacher", "mask_values", "mask_shape", "empty_batch", "int_dtype", "wrong_ndim",
          "length_mismatch"]


def _broken(kind: str, x):
    B, H, L = x["B"], x["H"], x["L"]
    args = {"q_s": _randn(x, B, H, L, 8), "k_s": _randn(x, B, H, L, 8), "q_t": _randn(x, B, H, L, 8),
            "k_t": _randn(x, B, H, L, 8), "mask": None}
    named = {"nan_student": "q_s", "inf_teacher": "k_t", "mask_values": "mask", "mask_shape": "mask",
             "empty_batch": "q_s", "int_dtype": "q_t", "wrong_ndim": "k_s", "length_mismatch": "q_t"}[kind]
    if kind == "nan_student":
        args["q_s"] = args["q_s"].clone().fill_(float("nan"))
    elif kind == "inf_teacher":
        args["k_t"] = args["k_t"].clone().fill_(float("inf"))
    elif kind == "mask_values":
        args["mask"] = torch.full((B, L), 2, device=DEVICE)
    elif kind == "mask_shape":
        args["mask"] = torch.ones(B, L + 1, dtype=torch.bool, device=DEVICE)
    elif kind == "empty_batch":
        args = {k: (v[:0] if v is not None else None) for k, v in args.items()}
    elif kind == "int_dtype":
        args["q_t"] = args["q_t"].to(torch.int32)
    elif kind == "wrong_ndim":
        args["k_s"] = args["k_s"][0]
    else:  # a teacher of another length than the student
        args["q_t"], args["k_t"] = _randn(x, B, H, L + 1, 8), _randn(x, B, H, L + 1, 8)
    return args, named


@pytest.mark.parametrize("name", ["attention_kl", "attention_mse"])
@BUDGET
@given(x=batches(), kind=st.sampled_from(BREAKS))
def test_invalid_inputs_are_refused_alike_naming_the_argument(monkeypatch, name, x, kind):
    args, named = _broken(kind, x)
    got = _both(lambda: getattr(losses, name)(**args), monkeypatch)
    assert all(isinstance(e, ValueError) for e in got), got
    assert str(got[0]) == str(got[1])  # the same refusal on both paths
    assert str(got[0]).startswith(f"{named}:"), (kind, str(got[0]))


HIDDEN_BREAKS = {"nan_student": "h_s", "inf_teacher": "h_t", "mask_values": "mask", "empty_length": "h_s",
                 "int_dtype": "h_t", "wrong_ndim": "h_s", "weight_shape": "weight", "nan_bias": "bias"}


@BUDGET
@given(x=batches(), kind=st.sampled_from(sorted(HIDDEN_BREAKS)))
def test_invalid_hidden_inputs_are_refused_alike_naming_the_argument(monkeypatch, x, kind):
    B, L = x["B"], x["L"]
    a = {"h_s": _randn(x, B, L, 8), "h_t": _randn(x, B, L, 12), "weight": _randn(x, 12, 8), "bias": _randn(x, 12),
         "mask": None}
    if kind == "nan_student":
        a["h_s"] = a["h_s"].clone().fill_(float("nan"))
    elif kind == "inf_teacher":
        a["h_t"] = a["h_t"].clone().fill_(float("-inf"))
    elif kind == "mask_values":
        a["mask"] = torch.full((B, L), -1, device=DEVICE)
    elif kind == "empty_length":
        a["h_s"], a["h_t"] = a["h_s"][:, :0], a["h_t"][:, :0]
    elif kind == "int_dtype":
        a["h_t"] = a["h_t"].to(torch.int64)
    elif kind == "wrong_ndim":
        a["h_s"] = a["h_s"][0]
    elif kind == "weight_shape":
        a["weight"] = a["weight"].T
    else:
        a["bias"] = a["bias"].clone().fill_(float("nan"))
    got = _both(lambda: losses.hidden_mse(**a), monkeypatch)
    assert all(isinstance(e, ValueError) for e in got), got
    assert str(got[0]) == str(got[1])
    assert str(got[0]).startswith(f"{HIDDEN_BREAKS[kind]}:"), (kind, str(got[0]))


@BUDGET
@given(P=st.integers(1, 3), M=st.integers(1, 5), N=st.integers(1, 6), seed=st.integers(0, 2**31 - 1))
def test_emd_loss_is_the_plans_cost_on_both_paths(monkeypatch, P, M, N, seed):
    cost, w_s, w_t = _transport_problem(P, M, N, seed, 2.0)
    for loss, plan in _both(lambda: losses.emd_loss(cost, w_s, w_t), monkeypatch):
        ref = (plan.double() * cost.double()).sum(dim=(1, 2))
        assert rel_err(loss.cpu(), ref.cpu()) < 1e-5
        assert torch.allclose(plan.sum(2).double(), w_s.double(), atol=2e-3)


@BUDGET
@given(x=batches(d_choices=(4, 8)), M=st.integers(1, 3), N=st.integers(1, 3))
def test_layer_costs_match_float64_pairwise_losses(monkeypatch, x, M, N):
    B, H, L = x["B"], x["H"], x["L"]
    x = {**x, "dtype": torch.float32}  # the Gram identity's cancellation: fp32 inputs, a stated 1e-3
    h_s, h_t = _randn(x, M, B, L, 8), _randn(x, N, B, L, 8).flip(-1)
    q_s, k_s = _randn(x, M, B, H, L, 8), _randn(x, M, B, H, L, 8).flip(-2)
    q_t, k_t = _randn(x, N, B, H, L, 4), _randn(x, N, B, H, L, 4).flip(-1)
    mask = None if x["mask"] is None else x["mask"].to(DEVICE)
    eye = torch.eye(8, device=DEVICE)
    for hidden, attention in _both(lambda: losses.layer_costs(h_s=h_s, h_t=h_t, q_s=q_s, k_s=k_s, q_t=q_t, k_t=k_t,
                                                              mask=mask), monkeypatch):
        for i in range(M):
            for j in range(N):
                h_ref = hidden_mse_f64(h_s[i], h_t[j], eye, torch.zeros(8, device=DEVICE), mask)
                a_ref = attention_mse_f64(q_s[i], k_s[i], q_t[j], k_t[j], mask)
                assert abs(float(hidden[i, j]) - float(h_ref)) <= 1e-3 * float(h_ref) + 1e-5
                assert abs(float(attention[i, j]) - float(a_ref)) <= 1e-3 * float(a_ref) + 1e-5
