"""MiniLM attention-KL, forward + backward: the fused one-pass kernel (kernels/attention_kl.py) vs the eager
reference (which materialises several [B, H, L, L] fp32 maps) vs torch.compile of that reference.

Shapes: B=32, H=12, d=64 on both sides, L ∈ {128, 512, 2048, 8192}, bf16, prefix padding mask (lengths uniform
in [L/2, L]). At L=8192 one fp32 score map is 103 GB, so eager and compiled run out of memory on an 80 GB GPU
(recorded as status "oom") while the fused kernel needs O(B·H·L) extra memory.

``bytes_moved`` is the fused kernel's minimum traffic, the same for every impl (Q_s, K_s, Q_t, K_t read by the
forward, the dQ pass and the dK pass, dQ_s and dK_s written), so GB/s compares implementations against one
roofline. ``flops`` counts the MMAs the fused kernel executes (recomputation included: forward 2 score maps,
dQ and dK passes 2 score maps + 1 gradient product each, the gradient product twice for bf16's hi/lo split).
On the CPU only the eager L=128 case runs: the Triton interpreter is no timing, torch.compile's build dominates
on 2 cores, and the eager maps at L ≥ 512 need GBs each.
"""

from __future__ import annotations

import pytest
import torch

from bench.conftest import HAS_CUDA
from fastkd import reference as ref

B, H, D = 32, 12, 64
LENGTHS = [128, 512, 2048, 8192]
DTYPE = torch.bfloat16

_compiled = None


def _inputs(L: int, device: str):
    g = torch.Generator().manual_seed(L)
    q_s, k_s, q_t, k_t = (torch.randn(B, H, L, D, generator=g).to(device, DTYPE) for _ in range(4))
    lens = torch.randint(L // 2, L + 1, (B,), generator=g)
    mask = (torch.arange(L)[None] < lens[:, None]).to(device)
    return q_s.requires_grad_(), k_s.requires_grad_(), q_t, k_t, mask


def _fused_flops(L: int) -> float:
    grad_products = 2 if DTYPE == torch.bfloat16 else 1
    per_head = 2 * L * L * (3 * (D + D) + 2 * grad_products * D)
    return float(B * H * per_head)


@pytest.mark.parametrize("L", LENGTHS)
@pytest.mark.parametrize("impl", ["fused", "eager", "compiled"])
def test_attention_kl_fwd_bwd(measure, impl, L):
    global _compiled
    device = "cuda" if HAS_CUDA else "cpu"
    if not HAS_CUDA and (impl != "eager" or L > 128):
        pytest.skip("CPU: only eager L=128 runs (Triton interpreter is no timing; compile and L×L maps too big)")
    if impl == "fused":
        from fastkd.kernels.attention_kl import attention_kl as loss_fn
    elif impl == "eager":
        loss_fn = ref.attention_kl
    else:
        if _compiled is None:
            _compiled = torch.compile(ref.attention_kl, dynamic=False)
        loss_fn = _compiled
    q_s, k_s, q_t, k_t, mask = _inputs(L, device)

    def step():
        q_s.grad = k_s.grad = None
        loss_fn(q_s, k_s, q_t, k_t, mask).backward()

    elt = torch.finfo(DTYPE).bits // 8
    bytes_moved = 14 * B * H * L * D * elt
    params = {"impl": impl, "B": B, "H": H, "L": L, "d": D, "dtype": DTYPE, "device": device}
    measure(step, "attention_kl_fwd_bwd", params, bytes_moved=bytes_moved, flops=_fused_flops(L),
            allow_oom=True,
            note="bytes_moved = fused minimum traffic (4 reads fwd, 4 reads + 1 write per bwd pass); "
                 "flops = fused kernel's MMAs incl. recompute")
