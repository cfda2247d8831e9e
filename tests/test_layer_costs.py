"""BERT-EMD layer cost matrices (fastkd.kernels.layer_costs) against looping the reference losses.

Ground truth: ref.hidden_mse / ref.attention_mse for every (student, teacher) layer pair, in float64 on the
same (possibly half-precision) inputs. Values and gradients of Σ R_ij·cost_ij (R random) w.r.t. h_s, weight,
bias, q_s, k_s. Tolerances (‖out − ref‖/‖ref‖): fp32 2e-5 values / 1e-4 grads (Gram identity in fp32);
fp16 and bf16 inputs: values 2e-5 (fp32 math on the exact half inputs), grads 2e-3 (fp16) / 1e-2 (bf16)
(rounded to the input dtype).
"""

import pytest
import torch

from fastkd import losses
from fastkd.losses import reference as ref
from fastkd.losses.emd_costs import layer_costs
from tests.helpers import rel_err

TOL = {torch.float32: (2e-5, 1e-4), torch.float16: (2e-5, 2e-3), torch.bfloat16: (2e-5, 1e-2)}


def _inputs(gen, dtype, M=3, N=4, B=2, L=7, H=2, d_s=8, d_t=12, hd_s=4, hd_t=6, logit_scale=1.0):
    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(dtype)

    h_s, h_t = r(M, B, L, d_s), r(N, B, L, d_t)
    weight, bias = r(d_t, d_s, scale=0.3), r(d_t, scale=0.1)
    # q/k as activation capture hands them over: [B, L, H, d] viewed as [B, H, L, d] (non-contiguous).
    q_s, k_s = (r(M, B, L, H, hd_s, scale=logit_scale).transpose(2, 3) for _ in range(2))
    q_t, k_t = (r(N, B, L, H, hd_t, scale=logit_scale).transpose(2, 3) for _ in range(2))
    return dict(h_s=h_s, h_t=h_t, weight=weight, bias=bias, q_s=q_s, k_s=k_s, q_t=q_t, k_t=k_t)


def _looped(x, mask):
    M, N = x["h_s"].shape[0], x["h_t"].shape[0]
    d = {k: v.double() for k, v in x.items()}
    hid = torch.stack([torch.stack([ref.hidden_mse(d["h_s"][i], d["h_t"][j], d["weight"], d["bias"], mask)
                                    for j in range(N)]) for i in range(M)])
    att = torch.stack([torch.stack([ref.attention_mse(d["q_s"][i], d["k_s"][i], d["q_t"][j], d["k_t"][j], mask)
                                    for j in range(N)]) for i in range(M)])
    return hid, att


def _grads(x, mask, fn, R_h, R_a):
    leaves = {k: x[k].detach().clone().requires_grad_() for k in ("h_s", "weight", "bias", "q_s", "k_s")}
    args = {**x, **leaves}
    if fn is None:
        hid, att = _looped({k: v for k, v in args.items()}, mask)
    else:
        hid, att = fn(**args, mask=mask)
    ((hid * R_h.to(hid.dtype)).sum() + (att * R_a.to(att.dtype)).sum()).backward()
    return hid, att, {k: v.grad for k, v in leaves.items()}


MASKS = {
    "none": lambda B, L: None,
    "padded": lambda B, L: torch.arange(L)[None, :] < torch.tensor([L, 3])[:, None],
    "one_valid_token": lambda B, L: torch.arange(L)[None, :] < torch.tensor([1, L - 2])[:, None],
}


@pytest.mark.parametrize("mask_kind", list(MASKS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_values_and_grads_match_looped_reference(dtype, mask_kind, gen):
    x = _inputs(gen, dtype)
    mask = MASKS[mask_kind](2, 7)
    M, N = 3, 4
    R_h, R_a = torch.rand(M, N, generator=gen), torch.rand(M, N, generator=gen)
    hid, att, g = _grads(x, mask, layer_costs, R_h, R_a)
    ref_hid, ref_att, ref_g = _grads(x, mask, None, R_h, R_a)
    assert hid.shape == att.shape == (M, N) and hid.dtype == att.dtype == torch.float32
    tol_v, tol_g = TOL[dtype]
    assert rel_err(hid, ref_hid) < tol_v and rel_err(att, ref_att) < tol_v
    for k in g:
        assert g[k].dtype == dtype
        assert rel_err(g[k], ref_g[k]) < tol_g, k


def test_large_logits_and_identical_layers(gen):
    # Scores ~30×: the Gram identity cancels more; a student layer equal to a teacher layer must cost ~0.
    x = _inputs(gen, torch.float32, hd_s=6, logit_scale=5.0, d_s=12)
    x["q_s"][1], x["k_s"][1] = x["q_t"][2], x["k_t"][2]
    x["h_s"][0] = x["h_t"][3]
    eye, zero = torch.eye(12), torch.zeros(12)
    hid, att = layer_costs(**{**x, "weight": eye, "bias": zero})
    ref_hid, ref_att = _looped({**x, "weight": eye, "bias": zero}, None)
    assert rel_err(att, ref_att) < 1e-4 and rel_err(hid, ref_hid) < 1e-4
    assert att[1, 2] <= 1e-5 * float(ref_att.max()) and hid[0, 3] <= 1e-5 * float(ref_hid.max())
    assert (att >= 0).all() and (hid >= 0).all()


def test_float64_and_one_side_only(gen):
    x = _inputs(gen, torch.float64)
    mask = MASKS["padded"](2, 7)
    hid, att = layer_costs(h_s=x["h_s"], h_t=x["h_t"], weight=x["weight"], bias=x["bias"], mask=mask)
    ref_hid, _ = _looped(x, mask)
    assert att is None and hid.dtype == torch.float64 and rel_err(hid, ref_hid) < 1e-12
    hid, att = losses.layer_costs(q_s=x["q_s"], k_s=x["k_s"], q_t=x["q_t"], k_t=x["k_t"], mask=mask)
    _, ref_att = _looped(x, mask)
    assert hid is None and rel_err(att, ref_att) < 1e-12


@pytest.mark.parametrize("change, name", [
    (dict(h_t=torch.rand(4, 2, 6, 12)), "h_t"),
    (dict(weight=torch.rand(12, 9)), "weight"),
    (dict(bias=torch.rand(8)), "bias"),
    (dict(k_s=torch.rand(3, 2, 2, 7, 5)), "k_s"),
    (dict(q_t=torch.rand(4, 2, 3, 7, 6), k_t=torch.rand(4, 2, 3, 7, 6)), "q_t"),
    (dict(q_s=torch.rand(3, 2, 7, 4)), "q_s"),
    (dict(mask=torch.zeros(2, 7, dtype=torch.bool)), "mask"),
    (dict(h_s=torch.zeros(3, 2, 7, 8, dtype=torch.int64)), "h_s"),
])
def test_bad_input_raises_value_error_naming_the_argument(change, name, gen):
    x = _inputs(gen, torch.float32)
    x.update(change)
    with pytest.raises(ValueError, match=f"^{name}:"):
        losses.layer_costs(**x)
