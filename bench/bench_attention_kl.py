"""MiniLM attention-KL, forward + backward: the fused one-pass kernel (kernels/attention_kl.py) vs the eager
reference (which materialises several [B, H, L, L] fp32 maps) vs torch.compile of that reference.

Shapes: B=32, H=12, d=64 on both sides, L ∈ {128, 512, 2048, 8192}, bf16, prefix padding mask (lengths uniform
in [L/2, L]). At L=8192 one fp32 score map is 103 GB, so eager and compiled run out of memory on an 80 GB GPU
(recorded as status "oom") while the fused kernel needs O(B·H·L) extra memory.

``bytes_moved`` is the fused kernels' minimum traffic, the same for every impl, in B·H·L·d bf16 tensors: the
forward reads Q_s, K_s, Q_t, K_t and writes dQ in fp32 (2), the dK pass reads the four and writes dK, the dQ
scaling reads the fp32 dQ (2) and writes it in bf16: 14. So GB/s compares implementations against one
roofline. ``flops`` counts the MMAs the fused kernels execute: the forward's 2 score maps and its 2 P·K products
(dQ), the dK pass's 2 score maps (the recomputation) and its dSᵀ·Q product; half precision's hi/lo split doubles
the P products, bf16's the dS product too.
On the CPU only the eager L=128 case runs: the Triton interpreter is no timing, torch.compile's build dominates
on 2 cores, and the eager maps at L ≥ 512 need GBs each.
"""

from __future__ import annotations

import pytest
import torch

from bench.attention_case import DTYPE, B, D, H, run_attention_case

LENGTHS = [128, 512, 2048, 8192]


def _fused_flops(L: int) -> float:
    split_p = 2 if DTYPE in (torch.bfloat16, torch.float16) else 1  # the forward's P, hi + lo
    split_ds = 2 if DTYPE == torch.bfloat16 else 1  # the dK pass's dS, hi + lo
    per_head = 2 * L * L * (2 * (D + D) + 2 * split_p * D + split_ds * D)
    return float(B * H * per_head)


@pytest.mark.parametrize("L", LENGTHS)
@pytest.mark.parametrize("impl", ["fused", "eager", "compiled"])
def test_attention_kl_fwd_bwd(measure, impl, L):
    run_attention_case(measure, "attention_kl", impl, L, bytes_per_elt_pass=14, flops=_fused_flops(L),
                       note="bytes_moved = fused minimum traffic (fwd 4 reads + fp32 dQ, dK 4 reads + 1 write, "
                            "dQ scaling); flops = fused kernels' MMAs incl. the dK pass's recompute")
