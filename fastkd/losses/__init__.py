"""fastkd's public distillation losses: ``from fastkd import losses``.

Conventions shared by every loss:

* ``mask`` is [B, L], bool or 0/1, 1 = real token; ``None`` means every token is real.
* Each returns a scalar (float32; float64 for float64 inputs), differentiable with respect to the student
  tensors. Teacher tensors need no grad. fp16/bf16 inputs are accumulated in fp32.
* Bad input raises ``ValueError`` naming the argument and what was expected, before any kernel runs.

Dispatch: CUDA tensors go to the fused Triton kernels, CPU tensors to the PyTorch references in
:mod:`fastkd.losses.reference`. ``FASTKD_BACKEND=triton|torch`` forces either (with ``TRITON_INTERPRET=1`` the
Triton path runs on the CPU, which is how the kernels are tested without a GPU).
"""

from __future__ import annotations

import math
import os

import torch
from torch import nn

from fastkd.losses import reference as ref
from fastkd.losses.checks import (
    check_directions,
    check_finite,
    check_float,
    check_histograms,
    check_mask,
    check_same_device,
    check_sinkhorn_args,
    check_transport,
)

__all__ = [
    "attention_mse",
    "attention_kl",
    "relation_kl",
    "hidden_mse",
    "attention_scores",
    "attention_mse_maps",
    "attention_kl_maps",
    "pkd_mse",
    "soft_cross_entropy",
    "sinkhorn",
    "emd_loss",
    "layer_costs",
    "AttentionMSE",
    "AttentionKL",
    "RelationKL",
    "HiddenMSE",
    "PKDMSE",
    "SoftCrossEntropy",
    "backend_for",
]


def backend_for(x: torch.Tensor) -> str:
    """'triton' or 'torch': which implementation a loss on tensor ``x`` runs."""
    forced = os.environ.get("FASTKD_BACKEND", "").strip().lower()
    if forced in ("torch", "triton"):
        return forced
    if forced:
        raise ValueError(f"FASTKD_BACKEND: expected 'triton', 'torch' or unset, got {forced!r}")
    return "triton" if x.is_cuda else "torch"


# ---------------------------------------------------------------- validation helpers


def _backend(*xs: torch.Tensor | None) -> str:
    """``backend_for`` the first tensor, except that float64 inputs always take the float64 reference: the
    kernels compute in fp32, which would silently break the promise of fp64 results."""
    if any(x is not None and x.dtype == torch.float64 for x in xs):
        return "torch"
    return backend_for(xs[0])


def _teacher(*xs: torch.Tensor | None):
    """Teacher tensors get no gradient, on either path (the kernels never produced one; the references did when
    a teacher tensor required grad)."""
    return tuple(None if x is None else x.detach() for x in xs)


def _zero_padding(mask: torch.Tensor | None, batch_dim: int, seq_dim: int, *xs: torch.Tensor):
    """The inputs with padded positions zeroed, for the references: the kernels never read padded tokens, and a
    NaN there leaked into the references' sums (0·NaN = NaN)."""
    if mask is None:
        return xs
    out = []
    for x in xs:
        shape = [1] * x.dim()
        shape[batch_dim], shape[seq_dim] = mask.shape
        out.append(torch.where(mask.reshape(shape), x, x.new_zeros(())))
    return tuple(out)


def _check_qk(q_s, k_s, q_t, k_t, mask):
    for name, x in (("q_s", q_s), ("k_s", k_s), ("q_t", q_t), ("k_t", k_t)):
        check_float(name, x, 4, "[B, H, L, d]")
    check_same_device(q_s=q_s, k_s=k_s, q_t=q_t, k_t=k_t, mask=mask)
    if k_s.shape != q_s.shape:
        raise ValueError(f"k_s: expected the shape of q_s {tuple(q_s.shape)}, got {tuple(k_s.shape)}")
    if k_t.shape != q_t.shape:
        raise ValueError(f"k_t: expected the shape of q_t {tuple(q_t.shape)}, got {tuple(k_t.shape)}")
    B, H, L, _ = q_s.shape
    if q_t.shape[0] != B or q_t.shape[2] != L:
        raise ValueError(
            f"q_t: expected batch {B} and length {L} (those of q_s), got shape {tuple(q_t.shape)}"
        )
    if q_t.shape[1] != H:
        raise ValueError(
            f"q_t: expected {H} heads (the student's; head counts must match, head dims may differ), "
            f"got {q_t.shape[1]}"
        )
    if 0 in (B, H, L, q_s.shape[-1], q_t.shape[-1]):
        raise ValueError(f"q_s: expected a non-empty batch, head count, sequence and head dim, got q_s "
                         f"{tuple(q_s.shape)} and q_t {tuple(q_t.shape)}")
    mask = check_mask(mask, B, L)
    check_finite(mask, batch_dim=-4, seq_dim=-2, q_s=q_s, k_s=k_s, q_t=q_t, k_t=k_t)
    return mask


# ---------------------------------------------------------------- attention losses


def attention_mse(q_s, k_s, q_t, k_t, mask=None) -> torch.Tensor:
    """TinyBERT's attention-score loss: mean over heads and valid (query, key) pairs of (S_s − S_t)²,
    S = q·kᵀ/√d. q, k: [B, H, L, d]; student and teacher head dims may differ, head counts must match."""
    mask = _check_qk(q_s, k_s, q_t, k_t, mask)
    q_t, k_t = _teacher(q_t, k_t)
    if _backend(q_s, k_s, q_t, k_t) == "triton":
        from fastkd.kernels.attention_mse import attention_mse as fused

        return fused(q_s, k_s, q_t, k_t, mask)
    return ref.attention_mse(*_zero_padding(mask, 0, 2, q_s, k_s, q_t, k_t), mask)


def attention_kl(q_s, k_s, q_t, k_t, mask=None) -> torch.Tensor:
    """MiniLM's attention-distribution loss: KL(softmax(S_t) ‖ softmax(S_s)) per query row, padded keys
    excluded from both softmaxes, mean over heads and valid query rows."""
    return _attention_kl(q_s, k_s, q_t, k_t, _check_qk(q_s, k_s, q_t, k_t, mask))


def _attention_kl(q_s, k_s, q_t, k_t, mask) -> torch.Tensor:
    """attention_kl on validated inputs (relation_kl has checked its own, so its split heads are not re-checked:
    that was a second validation and device sync per call)."""
    q_t, k_t = _teacher(q_t, k_t)
    if _backend(q_s, k_s, q_t, k_t) == "triton":
        from fastkd.kernels.attention_kl import attention_kl as fused

        return fused(q_s, k_s, q_t, k_t, mask)
    return ref.attention_kl(*_zero_padding(mask, 0, 2, q_s, k_s, q_t, k_t), mask)


# ---------------------------------------------------------------- attention losses on score maps
# The path for families whose real scores Q and K do not give (DeBERTa's disentangled terms, MPNet's relative
# bias): the capture hands over the model's own [B, H, L, L] scores. The maps are materialised, so this is the
# reference computation, O(B·H·L²) memory, not the fused kernels; the trainer says so when it takes it.


def _check_maps(s_s, s_t, mask):
    check_float("s_s", s_s, 4, "[B, H, L, L]")
    check_float("s_t", s_t, 4, "[B, H, L, L]")
    check_same_device(s_s=s_s, s_t=s_t, mask=mask)
    B, H, L, L2 = s_s.shape
    if L != L2 or 0 in s_s.shape:
        raise ValueError(f"s_s: expected non-empty square score maps [B, H, L, L], got {tuple(s_s.shape)}")
    if s_t.shape != s_s.shape:
        raise ValueError(f"s_t: expected the shape of s_s {tuple(s_s.shape)} (head counts must match), got "
                         f"{tuple(s_t.shape)}")
    mask = check_mask(mask, B, L)
    check_finite(mask, batch_dim=-4, seq_dim=-1, s_s=s_s, s_t=s_t)
    return mask


def attention_scores(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """S = q·kᵀ/√d [B, H, L, L] in fp32 (fp64 for fp64 inputs), materialised: for comparing a model's Q/K
    with another model's real score maps."""
    check_float("q", q, 4, "[B, H, L, d]")
    if k.shape != q.shape:
        raise ValueError(f"k: expected the shape of q {tuple(q.shape)}, got {tuple(k.shape)}")
    return ref.attention_scores(q, k, torch.float64 if q.dtype == torch.float64 else torch.float32)


def attention_mse_maps(s_s, s_t, mask=None) -> torch.Tensor:
    """:func:`attention_mse` on score maps s: [B, H, L, L] (mean over heads and valid pairs of (s_s − s_t)²)."""
    mask = _check_maps(s_s, s_t, mask)
    (s_t,) = _teacher(s_t)
    return ref.attention_mse_maps(s_s, s_t, mask)


def attention_kl_maps(s_s, s_t, mask=None) -> torch.Tensor:
    """:func:`attention_kl` on score maps s: [B, H, L, L] (padded keys excluded from both softmaxes)."""
    mask = _check_maps(s_s, s_t, mask)
    (s_t,) = _teacher(s_t)
    return ref.attention_kl_maps(s_s, s_t, mask)


def relation_kl(x_s, x_t, num_heads: int, mask=None) -> torch.Tensor:
    """MiniLM's value relation / MiniLMv2's Q-Q, K-K, V-V relations. x: [B, L, D_s] and [B, L, D_t], each
    split into ``num_heads`` relation heads; per head attention_kl(x, x, x', x') with scale 1/√(head dim)."""
    check_float("x_s", x_s, 3, "[B, L, D]")
    check_float("x_t", x_t, 3, "[B, L, D]")
    if not isinstance(num_heads, int) or isinstance(num_heads, bool) or num_heads < 1:
        raise ValueError(f"num_heads: expected a positive int, got {num_heads!r}")
    if x_t.shape[:2] != x_s.shape[:2]:
        raise ValueError(
            f"x_t: expected batch and length {tuple(x_s.shape[:2])} (those of x_s), got {tuple(x_t.shape)}"
        )
    for name, x in (("x_s", x_s), ("x_t", x_t)):
        if 0 in x.shape:
            raise ValueError(f"{name}: expected a non-empty batch, sequence and feature dim, got {tuple(x.shape)}")
        if x.shape[-1] % num_heads:
            raise ValueError(
                f"num_heads: {name}'s feature size {x.shape[-1]} is not divisible by num_heads={num_heads}"
            )
    check_same_device(x_s=x_s, x_t=x_t, mask=mask)
    mask = check_mask(mask, x_s.shape[0], x_s.shape[1])
    check_finite(mask, batch_dim=-3, seq_dim=-2, x_s=x_s, x_t=x_t)
    rs, rt = ref.split_heads(x_s, num_heads), ref.split_heads(x_t, num_heads)
    return _attention_kl(rs, rs, rt, rt, mask)


# ---------------------------------------------------------------- hidden-state losses


def _autocast_projection(h_s, weight, bias):
    """Under CUDA autocast, the projection's operands in the autocast dtype, as autocast gives F.linear.

    Why: a student's hidden states leave LayerNorm in fp32 under autocast and the projection's parameters are
    fp32, so without this the fused kernel would take its fp32 path (IEEE FMAs, no tensor cores, several times
    slower; see docs/kernels.md) exactly where eager PyTorch would run a bf16 GEMM. The residual, the square and
    the sum stay fp32 in the kernel. The casts are differentiable, so the fp32 parameters get fp32 grads."""
    if h_s.device.type != "cuda" or not torch.is_autocast_enabled("cuda"):
        return h_s, weight, bias
    dt = torch.get_autocast_dtype("cuda")
    return tuple(x if x is None or x.dtype == torch.float64 else x.to(dt) for x in (h_s, weight, bias))


def hidden_mse(h_s, h_t, weight=None, bias=None, mask=None) -> torch.Tensor:
    """TinyBERT's hidden/embedding loss: mean over valid tokens and teacher features of (h_s·Wᵀ + b − h_t)².

    h_s [B, L, d_s], h_t [B, L, d_t], weight [d_t, d_s] (nn.Linear's convention), bias [d_t]. With a leading
    layer dim (h [K, B, L, d], weight [K, d_t, d_s], bias [K, d_t]) it scores K layer pairs in one call and
    returns the mean over K of the per-pair losses.
    """
    check_float("h_s", h_s, (3, 4), "[B, L, d_s] or [K, B, L, d_s]")
    check_float("h_t", h_t, (3, 4), "[B, L, d_t] or [K, B, L, d_t]")
    check_same_device(h_s=h_s, h_t=h_t, weight=weight, bias=bias, mask=mask)
    if h_t.dim() != h_s.dim() or h_t.shape[:-1] != h_s.shape[:-1]:
        raise ValueError(
            f"h_t: expected leading dims {tuple(h_s.shape[:-1])} (those of h_s) and a feature dim, "
            f"got {tuple(h_t.shape)}"
        )
    layered = h_s.dim() == 4
    lead = (h_s.shape[0],) if layered else ()
    d_s, d_t = h_s.shape[-1], h_t.shape[-1]
    if weight is None:
        if d_s != d_t:
            raise ValueError(
                f"weight: needed because h_s has {d_s} features and h_t has {d_t}; expected shape "
                f"{list(lead) + [d_t, d_s]}"
            )
    else:
        check_float("weight", weight)
        if tuple(weight.shape) != (*lead, d_t, d_s):
            raise ValueError(f"weight: expected shape {list(lead) + [d_t, d_s]}, got {tuple(weight.shape)}")
    if bias is not None:
        check_float("bias", bias)
        if tuple(bias.shape) != (*lead, d_t):
            raise ValueError(f"bias: expected shape {list(lead) + [d_t]}, got {tuple(bias.shape)}")
    B, L = h_s.shape[-3], h_s.shape[-2]
    if 0 in (*h_s.shape, d_t):
        raise ValueError(f"h_s: expected non-empty dims (K, B, L and features), got h_s {tuple(h_s.shape)} and h_t "
                         f"{tuple(h_t.shape)}")
    mask = check_mask(mask, B, L)
    check_finite(mask, batch_dim=-3, seq_dim=-2, h_s=h_s, h_t=h_t)
    check_finite(weight=weight, bias=bias)
    (h_t,) = _teacher(h_t)
    if _backend(h_s, h_t, weight, bias) == "triton":
        from fastkd.kernels.hidden_mse import hidden_mse as fused

        h_s, weight, bias = _autocast_projection(h_s, weight, bias)
        return fused(h_s, h_t, weight, bias, mask)
    return ref.hidden_mse(*_zero_padding(mask, -3, -2, h_s, h_t), weight, bias, mask)


def pkd_mse(h_s, h_t) -> torch.Tensor:
    """Patient KD's loss: mean over the batch of ‖h_s/‖h_s‖₂ − h_t/‖h_t‖₂‖²; h: [B, d] ([CLS] vectors) or
    [K, B, d] (summed over the K layer pairs, as PKD does). Student and teacher widths must match. A zero vector
    has no direction: refused with a ValueError (with value checks off, F.normalize's eps rule applies: it is
    compared as the zero vector, a loss term of 1)."""
    check_float("h_s", h_s, (2, 3), "[B, d] or [K, B, d]")
    check_float("h_t", h_t, (2, 3), "[B, d] or [K, B, d]")
    check_same_device(h_s=h_s, h_t=h_t)
    if h_t.shape != h_s.shape:
        raise ValueError(f"h_t: expected shape {tuple(h_s.shape)} (that of h_s), got {tuple(h_t.shape)}")
    if 0 in h_s.shape:
        raise ValueError(f"h_s: expected a non-empty batch and width, got {tuple(h_s.shape)}")
    check_finite(h_s=h_s, h_t=h_t)
    check_directions(h_s=h_s, h_t=h_t)
    return ref.pkd_mse(h_s, *_teacher(h_t))


def soft_cross_entropy(logits_s, logits_t, temperature: float = 1.0) -> torch.Tensor:
    """Prediction-layer loss: mean over the batch of −Σ softmax(t/T)·log_softmax(s/T). logits: [B, C]."""
    check_float("logits_s", logits_s, 2, "[B, C]")
    check_float("logits_t", logits_t, 2, "[B, C]")
    check_same_device(logits_s=logits_s, logits_t=logits_t)
    if logits_t.shape != logits_s.shape:
        raise ValueError(
            f"logits_t: expected shape {tuple(logits_s.shape)} (that of logits_s), got {tuple(logits_t.shape)}"
        )
    if not (isinstance(temperature, (int, float)) and not isinstance(temperature, bool)
            and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature: expected a finite positive number, got {temperature!r}")
    if 0 in logits_s.shape:
        raise ValueError(f"logits_s: expected a non-empty batch and at least one class, got {tuple(logits_s.shape)}")
    check_finite(logits_s=logits_s, logits_t=logits_t)
    return ref.soft_cross_entropy(logits_s, *_teacher(logits_t), float(temperature))


# ---------------------------------------------------------------- BERT-EMD


def sinkhorn(cost, a, b, eps=None, iters=None) -> torch.Tensor:
    """Batched log-domain Sinkhorn: cost [P, M, N], a [P, M], b [P, N] (histograms, each summing to 1)
    -> transport plan [P, M, N]. ``eps`` is relative to each problem's cost scale."""
    check_transport(cost, a, b)
    return _sinkhorn(cost, a, b, eps, iters, "a", "b")


def _sinkhorn(cost, a, b, eps, iters, a_name: str, b_name: str) -> torch.Tensor:
    check_sinkhorn_args(eps, iters)
    check_finite(cost=cost)
    check_histograms(**{a_name: a, b_name: b})
    if _backend(cost, a, b) == "triton":
        from fastkd.kernels.sinkhorn import sinkhorn as fused

        return fused(cost, a, b, eps=eps, iters=iters)
    return ref.sinkhorn(cost, a, b, eps=eps, iters=iters)


def emd_loss(cost, w_s, w_t, *, eps=None, iters=None) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT-EMD's loss: (loss [P] = Σ f_ij·d_ij, plan f [P, M, N]), the plan a constant, so ∂loss/∂cost = f."""
    check_transport(cost, w_s, w_t, "w_s", "w_t")
    plan = _sinkhorn(cost, w_s, w_t, eps, iters, "w_s", "w_t").detach()
    loss = (plan.to(cost.dtype) * cost).sum(dim=(1, 2), dtype=torch.float32 if cost.dtype != torch.float64
                                                  else torch.float64)
    return loss, plan


def layer_costs(h_s=None, h_t=None, weight=None, bias=None, q_s=None, k_s=None, q_t=None, k_t=None, mask=None):
    """BERT-EMD's cost matrices: (hidden [M, N], attention [M, N]) with entry (i, j) = hidden_mse(h_s[i], h_t[j],
    weight, bias, mask) and attention_mse(q_s[i], k_s[i], q_t[j], k_t[j], mask). h: [M|N, B, L, d],
    q/k: [M|N, B, H, L, d]; either side may be None. Computed from Gram matrices (one GEMM per side, any
    device); validation is in :func:`fastkd.kernels.layer_costs.layer_costs`."""
    from fastkd.losses.emd_costs import layer_costs as gram_costs

    return gram_costs(h_s, h_t, weight, bias, q_s, k_s, q_t, k_t, mask)


# ---------------------------------------------------------------- nn.Module wrappers


class AttentionMSE(nn.Module):
    def forward(self, q_s, k_s, q_t, k_t, mask=None):
        return attention_mse(q_s, k_s, q_t, k_t, mask)


class AttentionKL(nn.Module):
    def forward(self, q_s, k_s, q_t, k_t, mask=None):
        return attention_kl(q_s, k_s, q_t, k_t, mask)


class RelationKL(nn.Module):
    def __init__(self, num_heads: int):
        super().__init__()
        self.num_heads = num_heads

    def forward(self, x_s, x_t, mask=None):
        return relation_kl(x_s, x_t, self.num_heads, mask)


class HiddenMSE(nn.Module):
    """hidden_mse with a learnable projection (TinyBERT's fit_dense) when d_s != d_t."""

    def __init__(self, d_s: int, d_t: int, bias: bool = True):
        super().__init__()
        self.proj = nn.Linear(d_s, d_t, bias=bias) if d_s != d_t else None

    def forward(self, h_s, h_t, mask=None):
        if self.proj is None:
            return hidden_mse(h_s, h_t, mask=mask)
        return hidden_mse(h_s, h_t, self.proj.weight, self.proj.bias, mask)


class PKDMSE(nn.Module):
    def forward(self, h_s, h_t):
        return pkd_mse(h_s, h_t)


class SoftCrossEntropy(nn.Module):
    def __init__(self, temperature: float = 1.0):
        super().__init__()
        self.temperature = temperature

    def forward(self, logits_s, logits_t):
        return soft_cross_entropy(logits_s, logits_t, self.temperature)
