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
import torch

from bench.conftest import HAS_CUDA
from fastkd import reference as ref

B, H, D = 32, 12, 64
LENGTHS = [128, 512, 2048]
DTYPE = torch.bfloat16

_compiled = None


def _inputs(L: int, device: str):
    g = torch.Generator().manual_seed(L)
    q_s, k_s, q_t, k_t = (torch.randn(B, H, L, D, generator=g).to(device, DTYPE) for _ in range(4))
    lens = torch.randint(L // 2, L + 1, (B,), generator=g)
    mask = (torch.arange(L)[None] < lens[:, None]).to(device)
    return q_s.requires_grad_(), k_s.requires_grad_(), q_t, k_t, mask


@pytest.mark.parametrize("L", LENGTHS)
@pytest.mark.parametrize("impl", ["fused", "eager", "compiled"])
def test_attention_mse_fwd_bwd(measure, impl, L):
    global _compiled
    device = "cuda" if HAS_CUDA else "cpu"
    if not HAS_CUDA and (impl != "eager" or L > 128):
        pytest.skip("CPU: only eager L=128 runs (Triton interpreter is no timing; compile and L×L maps too big)")
    if impl == "fused":
        from fastkd.kernels.attention_mse import attention_mse as loss_fn
    elif impl == "eager":
        loss_fn = ref.attention_mse
    else:
        if _compiled is None:
            _compiled = torch.compile(ref.attention_mse, dynamic=False)
        loss_fn = _compiled
    q_s, k_s, q_t, k_t, mask = _inputs(L, device)

    def step():
        q_s.grad = k_s.grad = None
        loss_fn(q_s, k_s, q_t, k_t, mask).backward()

    elt = torch.finfo(DTYPE).bits // 8
    bytes_moved = 10 * B * H * L * D * elt
    params = {"impl": impl, "B": B, "H": H, "L": L, "d": D, "dtype": DTYPE, "device": device}
    measure(step, "attention_mse_fwd_bwd", params, bytes_moved=bytes_moved, allow_oom=True,
            note="bytes_moved = fused minimum traffic (4 reads fwd, 4 reads + 2 writes bwd)")
