"""TinyBERT attention-score MSE, forward + backward: fused Gram-form kernel vs the eager reference (which
materialises the [B, H, L, L] score maps) vs torch.compile of that reference.

Shapes: B=32, H=12, d=64 (BERT-base heads on both sides), L ∈ {128, 512, 2048}, bf16, prefix padding mask
(lengths uniform in [L/2, L]). ``bytes_moved`` is the fused kernel's minimum traffic, the same for every impl
(read Q_s, K_s, Q_t, K_t in the forward and again in the backward, write dQ_s, dK_s), so GB/s compares
implementations against one roofline. On the CPU only the eager L=128 case runs: the Triton interpreter is no
timing, torch.compile's build dominates on 2 cores, and the eager maps at L ≥ 512 need 2–26 GB each.
"""

from __future__ import annotations

import pytest

from bench.attention_case import run_attention_case

LENGTHS = [128, 512, 2048]


@pytest.mark.parametrize("L", LENGTHS)
@pytest.mark.parametrize("impl", ["fused", "eager", "compiled"])
def test_attention_mse_fwd_bwd(measure, impl, L):
    run_attention_case(measure, "attention_mse", impl, L, bytes_per_elt_pass=10,
                       note="bytes_moved = fused minimum traffic (4 reads fwd, 4 reads + 2 writes bwd)")
