"""TinyBERT projected hidden-state MSE, K = 5 layer pairs, forward + backward: the fused forward (one launch,
R stored in bf16) with its cuBLAS backward vs the eager reference vs torch.compile of it, and, as the trainer
runs it, both under bf16 autocast with fp32 student hidden states and projection (``*-autocast``: the eager
side is bench/roofline.py's ``eager_hidden_mse_autocast``, the issue's "eager under bf16 autocast").

Shapes: N = B·L with B = 32, L ∈ {128, 512}; d_s = 384 (student), d_t = 768 (teacher), K = 5 (a 4-layer
student's embedding + 4 layers), bf16 activations and projection, prefix padding mask. ``bytes_moved`` is the
fused minimum traffic (H_s, H_t read and R written in the forward; R read twice and H_s once more, dH_s
written in the backward; W, b, dW, db negligible), ``flops`` the three GEMMs (3 × 2·K·N·d_s·d_t). On the CPU
only eager L=128 runs.
"""

from __future__ import annotations

import pytest
import torch

from bench.harness import HAS_CUDA
from bench.roofline import eager_hidden_mse_autocast
from fastkd.losses import reference as ref

B, K, D_S, D_T = 32, 5, 384, 768
LENGTHS = [128, 512]
DTYPE = torch.bfloat16

_compiled = None


def _inputs(L: int, device: str, student_dtype=DTYPE):
    g = torch.Generator().manual_seed(L)
    h_s = torch.randn(K, B, L, D_S, generator=g).to(device, student_dtype).requires_grad_()
    h_t = torch.randn(K, B, L, D_T, generator=g).to(device, DTYPE)
    weight = (torch.randn(K, D_T, D_S, generator=g) / D_S**0.5).to(device, student_dtype).requires_grad_()
    bias = torch.zeros(K, D_T).to(device, student_dtype).requires_grad_()
    lens = torch.randint(L // 2, L + 1, (B,), generator=g)
    mask = (torch.arange(L)[None] < lens[:, None]).to(device)
    return h_s, h_t, weight, bias, mask


@pytest.mark.parametrize("L", LENGTHS)
@pytest.mark.parametrize("impl", ["fused", "eager", "compiled", "fused-autocast", "eager-autocast"])
def test_hidden_mse_fwd_bwd(measure, impl, L):
    global _compiled
    device = "cuda" if HAS_CUDA else "cpu"
    if not HAS_CUDA and (impl != "eager" or L > 128):
        pytest.skip("CPU: only eager L=128 runs (Triton interpreter is no timing; compile too slow on 2 cores)")
    if impl.startswith("fused"):
        from fastkd.losses import hidden_mse as loss_fn  # the checked API: it applies the autocast dtype
    elif impl == "eager":
        loss_fn = ref.hidden_mse
    elif impl == "eager-autocast":
        loss_fn = eager_hidden_mse_autocast
    else:
        if _compiled is None:
            _compiled = torch.compile(ref.hidden_mse, dynamic=False)
        loss_fn = _compiled
    autocast = impl.endswith("autocast")
    h_s, h_t, weight, bias, mask = _inputs(L, device, torch.float32 if autocast else DTYPE)

    def step():
        h_s.grad = weight.grad = bias.grad = None
        with torch.autocast("cuda", DTYPE, enabled=autocast):
            loss_fn(h_s, h_t, weight, bias, mask).backward()

    N = B * L
    elt = torch.finfo(DTYPE).bits // 8
    bytes_moved = (3 * K * N * D_S + 4 * K * N * D_T) * elt
    flops = 3 * 2 * K * N * D_S * D_T
    params = {"impl": impl, "B": B, "L": L, "N": N, "K": K, "d_s": D_S, "d_t": D_T, "dtype": DTYPE,
              "device": device}
    measure(step, "hidden_mse_fwd_bwd", params, bytes_moved=bytes_moved, flops=flops, allow_oom=True,
            note="bytes/flops = fused minimum")
