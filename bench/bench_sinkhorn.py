"""BERT-EMD's per-step optimal transport: P problems of M×N (student × teacher layers).

Implementations (param ``impl``):
* ``triton``: fastkd.kernels.sinkhorn, all P problems in one launch (GPU only; the interpreter is no timing).
* ``torch_batched``: fastkd.losses.reference.sinkhorn over all P at once (float64, eager PyTorch).
* ``torch_loop``: the reference called once per problem, as a per-problem port would.
* ``scipy_exact``: scipy.optimize.linprog (HiGHS) per problem, the CPU exact solver (BERT-EMD uses pyemd).
Looping implementations time ``min(P, LOOP_SAMPLE)`` problems and scale linearly to P (``params.timed_problems``
says how many were timed), so the P=1024 rows stay affordable; the note says so.
"""

from __future__ import annotations

import pytest
import torch

from bench.harness import HAS_CUDA
from fastkd.losses import reference as ref

SHAPES = [(4, 12), (6, 12), (12, 24)]
PROBLEMS = [1, 64, 1024]
LOOP_SAMPLE = 8 if not HAS_CUDA else 32


def _problems(P: int, M: int, N: int, device: str):
    g = torch.Generator().manual_seed(P * 1000 + M * 31 + N)
    cost = (torch.rand(P, M, N, generator=g) * 5).to(device)
    a = torch.rand(P, M, generator=g) + 0.1
    b = torch.rand(P, N, generator=g) + 0.1
    return cost, (a / a.sum(1, keepdim=True)).to(device), (b / b.sum(1, keepdim=True)).to(device)


def _linprog_emd(cost, a, b):
    import numpy as np
    from scipy.optimize import linprog

    M, N = cost.shape
    A_eq = np.zeros((M + N, M * N))
    for i in range(M):
        A_eq[i, i * N:(i + 1) * N] = 1
    for j in range(N):
        A_eq[M + j, j::N] = 1
    res = linprog(cost.reshape(-1), A_eq=A_eq, b_eq=np.concatenate([a, b]), bounds=(0, None), method="highs")
    if not res.success:
        raise RuntimeError(f"linprog failed: {res.message}")
    return res.x.reshape(M, N)


@pytest.mark.parametrize("M, N", SHAPES, ids=lambda v: str(v))
@pytest.mark.parametrize("P", PROBLEMS)
@pytest.mark.parametrize("impl", ["triton", "torch_batched", "torch_loop", "scipy_exact"])
def test_sinkhorn(measure, impl, P, M, N):
    device = "cuda" if HAS_CUDA else "cpu"
    params = {"impl": impl, "P": P, "M": M, "N": N, "device": device}
    note = None
    if impl == "triton":
        if not HAS_CUDA:
            pytest.skip("needs a CUDA GPU: the Triton interpreter on the CPU is not a timing")
        from fastkd.kernels.sinkhorn import sinkhorn as fused

        cost, a, b = _problems(P, M, N, device)
        fn = lambda: fused(cost, a, b)
    elif impl == "torch_batched":
        if P == 1024 and not HAS_CUDA:
            pytest.skip("P=1024 batched float64 reference takes minutes on a 2-core CPU; run it on a GPU host")
        cost, a, b = _problems(P, M, N, device)
        fn = lambda: ref.sinkhorn(cost, a, b)
    else:
        k = min(P, LOOP_SAMPLE)
        cost, a, b = _problems(k, M, N, "cpu" if impl == "scipy_exact" else device)
        params["timed_problems"] = k
        if k < P:
            note = f"timed {k} of {P} problems, scaled ×{P / k:g}"
        if impl == "torch_loop":
            fn = lambda: [ref.sinkhorn(cost[p:p + 1], a[p:p + 1], b[p:p + 1]) for p in range(k)]
        else:
            # float32 histograms renormalised in float64, else the LP's equal-mass constraint is infeasible.
            c64, a64, b64 = cost.double().numpy(), a.double(), b.double()
            a64, b64 = (a64 / a64.sum(1, keepdim=True)).numpy(), (b64 / b64.sum(1, keepdim=True)).numpy()
            fn = lambda: [_linprog_emd(c64[p], a64[p], b64[p]) for p in range(k)]
    measure(fn, "sinkhorn", params, rounds=3 if P > 1 else 5, note=note,
            time_scale=P / params.get("timed_problems", P))


# ---------------------------------------------------------------- the cost matrices that feed the transport


@pytest.mark.parametrize("impl", ["gram", "looped_reference"])
@pytest.mark.parametrize("B, L", [(32, 64), (32, 128)])
def test_layer_costs(measure, impl, B, L):
    """TinyBERT-4 student (4 layers, 312 wide, 12 heads of 26) vs the MiniLM teacher (6 layers, 384, 12 × 32):
    both M×N cost matrices, forward + backward (what a BERT-EMD step pays before the transport)."""
    from fastkd.losses.emd_costs import layer_costs

    device = "cuda" if HAS_CUDA else "cpu"
    dtype = torch.bfloat16 if HAS_CUDA else torch.float32
    M, N, H, d_s, d_t = 4, 6, 12, 312, 384
    g = torch.Generator().manual_seed(0)

    def r(*shape, grad=False):
        x = torch.randn(*shape, generator=g).to(device=device, dtype=dtype)
        return x.requires_grad_(grad)

    h_s, h_t = r(M, B, L, d_s, grad=True), r(N, B, L, d_t)
    weight, bias = r(d_t, d_s, grad=True), r(d_t, grad=True)
    q_s, k_s = r(M, B, H, L, d_s // H, grad=True), r(M, B, H, L, d_s // H, grad=True)
    q_t, k_t = r(N, B, H, L, d_t // H), r(N, B, H, L, d_t // H)
    mask = (torch.arange(L)[None, :] < torch.randint(L // 2, L + 1, (B,), generator=g)[:, None]).to(device)

    def looped():
        hid = torch.stack([torch.stack([ref.hidden_mse(h_s[i], h_t[j], weight, bias, mask) for j in range(N)])
                           for i in range(M)])
        att = torch.stack([torch.stack([ref.attention_mse(q_s[i], k_s[i], q_t[j], k_t[j], mask)
                                        for j in range(N)]) for i in range(M)])
        return hid, att

    fn = (lambda: layer_costs(h_s, h_t, weight, bias, q_s, k_s, q_t, k_t, mask)) if impl == "gram" else looped

    def step():
        hid, att = fn()
        (hid.sum() + att.sum()).backward()

    nbytes = sum(x.numel() * x.element_size() for x in (h_s, h_t, q_s, k_s, q_t, k_t))
    measure(step, "layer_costs", {"impl": impl, "M": M, "N": N, "B": B, "L": L, "dtype": dtype, "device": device},
            bytes_moved=nbytes, allow_oom=impl != "gram", rounds=3,
            note="fwd+bwd; bytes_moved = one read of every layer's inputs")
