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

from bench.attention_case import DTYPE, B, D, H, run_attention_case

LENGTHS = [128, 512, 2048, 8192]


def _fused_flops(L: int) -> float:
    grad_products = 2 if DTYPE == torch.bfloat16 else 1  # bf16 splits the gradient product into hi + lo
    per_head = 2 * L * L * (3 * (D + D) + 2 * grad_products * D)
    return float(B * H * per_head)


@pytest.mark.parametrize("L", LENGTHS)
@pytest.mark.parametrize("impl", ["fused", "eager", "compiled"])
def test_attention_kl_fwd_bwd(measure, impl, L):
    run_attention_case(measure, "attention_kl", impl, L, bytes_per_elt_pass=14, flops=_fused_flops(L),
                       note="bytes_moved = fused minimum traffic (4 reads fwd, 4 reads + 1 write per bwd pass); "
                            "flops = fused kernel's MMAs incl. recompute")
