"""The shared body of the attention-loss benchmarks (attention_kl, attention_mse): same inputs, same three
implementations (fused Triton kernel, eager reference, torch.compile of the reference), forward + backward."""

from __future__ import annotations

import importlib

import pytest
import torch

from bench.harness import HAS_CUDA
from fastkd.losses import reference as ref

B, H, D = 32, 12, 64
DTYPE = torch.bfloat16
_compiled: dict[str, object] = {}


def attention_inputs(L: int, device: str):
    """bf16 Q/K for student and teacher and a prefix padding mask with lengths uniform in [L/2, L]."""
    g = torch.Generator().manual_seed(L)
    q_s, k_s, q_t, k_t = (torch.randn(B, H, L, D, generator=g).to(device, DTYPE) for _ in range(4))
    lens = torch.randint(L // 2, L + 1, (B,), generator=g)
    mask = (torch.arange(L)[None] < lens[:, None]).to(device)
    return q_s.requires_grad_(), k_s.requires_grad_(), q_t, k_t, mask


def run_attention_case(measure, loss: str, impl: str, L: int, *, bytes_per_elt_pass: int, flops=None, note=""):
    """Time fwd+bwd of ``loss`` ('attention_kl' | 'attention_mse') with ``impl`` at length L.
    ``bytes_per_elt_pass``: how many B·H·L·d tensors the fused kernel must read or write in total."""
    device = "cuda" if HAS_CUDA else "cpu"
    if not HAS_CUDA and (impl != "eager" or L > 128):
        pytest.skip("CPU: only eager L=128 runs (Triton interpreter is no timing; compile and L×L maps too big)")
    if impl == "fused":
        loss_fn = getattr(importlib.import_module(f"fastkd.kernels.{loss}"), loss)
    elif impl == "eager":
        loss_fn = getattr(ref, loss)
    else:
        if loss not in _compiled:
            _compiled[loss] = torch.compile(getattr(ref, loss), dynamic=False)
        loss_fn = _compiled[loss]
    q_s, k_s, q_t, k_t, mask = attention_inputs(L, device)

    def step():
        q_s.grad = k_s.grad = None
        loss_fn(q_s, k_s, q_t, k_t, mask).backward()

    elt = torch.finfo(DTYPE).bits // 8
    params = {"impl": impl, "B": B, "H": H, "L": L, "d": D, "dtype": DTYPE, "device": device}
    return measure(step, f"{loss}_fwd_bwd", params, bytes_moved=bytes_per_elt_pass * B * H * L * D * elt,
                   flops=flops, allow_oom=True, note=note)
