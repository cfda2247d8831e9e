"""BERT-EMD's cost matrices: every student layer i against every teacher layer j, from Gram matrices.

hidden_cost[i, j] = hidden_mse(h_s[i], h_t[j], weight, bias, mask) and attention_cost[i, j] =
attention_mse(q_s[i], k_s[i], q_t[j], k_t[j], mask) (the semantics of :mod:`fastkd.losses.reference`: means over valid
tokens / valid (query, key) pairs). Looping the M·N pairs reads every layer M or N times and, for attention,
materialises M·N score maps of B·H·L·L. Instead, with padded tokens zeroed:

* hidden: P_i = h_s,i·Wᵀ + b, ‖P_i − T_j‖² = ‖P_i‖² + ‖T_j‖² − 2⟨P_i, T_j⟩, so the M×N cross terms are ONE GEMM
  [M, B·L·d_t] × [B·L·d_t, N] and the norms are row reductions: each layer is read once.
* attention, per (b, h), S = Q·Kᵀ/√d:  ⟨S_s, S_t⟩ = ⟨Q_sᵀQ_t, K_sᵀK_t⟩ / √(d_s·d_t) and
  ‖S‖² = ⟨QᵀQ, KᵀK⟩ / d. With the layers laid side by side, Q_sᵀQ_t for all (i, j) is one batched GEMM over
  B·H of [M·d_s, L] × [L, N·d_t] (likewise for K), followed by an elementwise product reduced per (i, j) block.
  Work is O(B·H·L·M·N·d_s·d_t) instead of O(B·H·L²·M·N·(d_s + d_t)): cheaper whenever L > d, and no L×L map.

What is fused and what is not: the heavy parts are cuBLAS GEMMs (via torch.matmul) over all layer pairs at once,
and autograd differentiates through them (w.r.t. h_s, weight, bias, q_s, k_s; teacher tensors too if they
require grad). The [B·H, M·d_s, N·d_t] Gram products are materialised (B=32, H=12, M=4, N=6, d=32: 38 MB each,
processed in chunks of ``chunk_bh`` heads to bound it). A Triton kernel computing the two cross-Grams and
their inner product per (b·h, i, j) tile without writing them out is NOT done yet.

Precision: inputs are upcast to fp32 (fp64 stays fp64) before the GEMMs; results are fp32 (fp64). The Gram
identity subtracts large nearly equal terms when student ≈ teacher (cost ≪ the norms): the absolute error is
~1e-7·‖S‖² per entry in fp32, so costs near zero carry that absolute error; they are clamped at 0.
"""

from __future__ import annotations

import math

import torch

from fastkd.losses.checks import check_finite, check_float, check_mask, check_same_device

__all__ = ["layer_costs", "hidden_costs", "attention_costs"]

_CHUNK_BH = 64  # (batch·head) slices per Gram chunk: bounds the [chunk, M·d_s, N·d_t] temporaries


def _acc(*xs: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(x is not None and x.dtype == torch.float64 for x in xs) else torch.float32


def hidden_costs(h_s: torch.Tensor, h_t: torch.Tensor, weight: torch.Tensor | None = None,
                 bias: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
    """[M, N] matrix of hidden_mse(h_s[i], h_t[j], weight, bias, mask); h_s [M, B, L, d_s], h_t [N, B, L, d_t].
    Inputs assumed validated (see :func:`layer_costs`)."""
    dt = _acc(h_s, h_t, weight)
    M, N, d_t = h_s.shape[0], h_t.shape[0], h_t.shape[-1]
    proj = h_s.to(dt)
    if weight is not None:
        proj = torch.matmul(proj, weight.to(dt).t())
    if bias is not None:
        proj = proj + bias.to(dt)
    tgt = h_t.to(dt)
    if mask is not None:
        m = mask[None, :, :, None]
        # padded tokens contribute 0 to every norm and cross term (where, not a product: 0·NaN would be NaN)
        proj, tgt = torch.where(m, proj, 0.0), torch.where(m, tgt, 0.0)
        count = mask.sum().to(dt) * d_t
    else:
        count = torch.tensor(float(h_s.shape[1] * h_s.shape[2] * d_t), dtype=dt, device=h_s.device)
    p, t = proj.reshape(M, -1), tgt.reshape(N, -1)
    sq = p.square().sum(1)[:, None] + t.square().sum(1)[None, :] - 2 * (p @ t.t())
    return sq.clamp_min(0) / count


def _self_gram_term(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Σ_(b,h) ‖q·kᵀ‖² / d per layer: q, k [K, B, H, L, d] -> [K]."""
    gq = torch.matmul(q.transpose(-1, -2), q)  # [K, B, H, d, d]
    gk = torch.matmul(k.transpose(-1, -2), k)
    return (gq * gk).sum(dim=(1, 2, 3, 4)) / q.shape[-1]


def _side_by_side(x: torch.Tensor) -> torch.Tensor:
    """[K, B, H, L, d] -> [B·H, L, K·d]: every layer's head side by side, so one GEMM covers all layer pairs."""
    K, B, H, L, d = x.shape
    return x.permute(1, 2, 3, 0, 4).reshape(B * H, L, K * d)


def attention_costs(q_s: torch.Tensor, k_s: torch.Tensor, q_t: torch.Tensor, k_t: torch.Tensor,
                    mask: torch.Tensor | None = None, chunk_bh: int = _CHUNK_BH) -> torch.Tensor:
    """[M, N] matrix of attention_mse(q_s[i], k_s[i], q_t[j], k_t[j], mask); q, k [M|N, B, H, L, d].
    Inputs assumed validated (see :func:`layer_costs`)."""
    dt = _acc(q_s, q_t)
    M, B, H, L, d_s = q_s.shape
    N, d_t = q_t.shape[0], q_t.shape[-1]
    qs, ks, qt, kt = (x.to(dt) for x in (q_s, k_s, q_t, k_t))
    if mask is not None:
        m = mask[None, :, None, :, None]
        # zero rows => zero scores on every padded pair (where, not a product: 0·NaN would be NaN)
        qs, ks, qt, kt = (torch.where(m, x, 0.0) for x in (qs, ks, qt, kt))
        pairs = H * mask.sum(1).to(dt).square().sum()
    else:
        pairs = torch.tensor(float(B * H * L * L), dtype=dt, device=q_s.device)
    self_s = _self_gram_term(qs, ks)  # [M]
    self_t = _self_gram_term(qt, kt)  # [N]
    Qs, Ks, Qt, Kt = (_side_by_side(x) for x in (qs, ks, qt, kt))
    cross = torch.zeros(M, N, dtype=dt, device=q_s.device)
    for c in range(0, B * H, chunk_bh):
        sl = slice(c, c + chunk_bh)
        gq = torch.matmul(Qs[sl].transpose(1, 2), Qt[sl])  # [bh, M·d_s, N·d_t]
        gk = torch.matmul(Ks[sl].transpose(1, 2), Kt[sl])
        cross = cross + (gq * gk).view(-1, M, d_s, N, d_t).sum(dim=(0, 2, 4))
    cross = cross / math.sqrt(d_s * d_t)
    sq = self_s[:, None] + self_t[None, :] - 2 * cross
    return sq.clamp_min(0) / pairs


def layer_costs(h_s: torch.Tensor | None = None, h_t: torch.Tensor | None = None,
                weight: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                q_s: torch.Tensor | None = None, k_s: torch.Tensor | None = None,
                q_t: torch.Tensor | None = None, k_t: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(hidden_cost [M, N], attention_cost [M, N]) for BERT-EMD; either side may be skipped (pass None for its
    tensors, get None back).

    h_s [M, B, L, d_s], h_t [N, B, L, d_t], weight [d_t, d_s] and bias [d_t] (one shared fit_dense, as BERT-EMD);
    q_s, k_s [M, B, H, L, d_s'], q_t, k_t [N, B, H, L, d_t'] (head dims may differ, head counts must match);
    mask [B, L] (1 = real token). Differentiable w.r.t. every tensor that requires grad."""
    hidden = attention = None
    shapes: list[tuple[int, int]] = []
    if h_s is not None or h_t is not None:
        _check_hidden(h_s, h_t, weight, bias)
        shapes.append((h_s.shape[1], h_s.shape[2]))
    if any(x is not None for x in (q_s, k_s, q_t, k_t)):
        _check_attention(q_s, k_s, q_t, k_t)
        shapes.append((q_s.shape[1], q_s.shape[3]))
    if not shapes:
        raise ValueError("h_s: expected hidden states (h_s, h_t) and/or attention inputs (q_s, k_s, q_t, k_t)")
    if len(shapes) == 2 and shapes[0] != shapes[1]:
        raise ValueError(f"q_s: expected batch and length {shapes[0]} (those of h_s), got {shapes[1]}")
    check_same_device(h_s=h_s, h_t=h_t, weight=weight, bias=bias, q_s=q_s, k_s=k_s, q_t=q_t, k_t=k_t, mask=mask)
    mask = check_mask(mask, *shapes[0])
    # NaN/inf at a valid position of either side, as hidden_mse and attention_mse refuse it (it once came out as
    # NaN costs); h [K, B, L, d] and q/k [K, B, H, L, d] put the batch at dim 1 and the tokens at 2 and 3.
    check_finite(mask, batch_dim=1, seq_dim={"h_s": 2, "h_t": 2, "q_s": 3, "k_s": 3, "q_t": 3, "k_t": 3},
                 h_s=h_s, h_t=h_t, q_s=q_s, k_s=k_s, q_t=q_t, k_t=k_t, weight=weight, bias=bias)  # one sync
    if h_s is not None:
        hidden = hidden_costs(h_s, h_t, weight, bias, mask)
    if q_s is not None:
        attention = attention_costs(q_s, k_s, q_t, k_t, mask)
    return hidden, attention


def _check_hidden(h_s, h_t, weight, bias) -> None:
    check_float("h_s", h_s, 4, "[M, B, L, d_s]")
    check_float("h_t", h_t, 4, "[N, B, L, d_t]")
    if h_t.shape[1:3] != h_s.shape[1:3]:
        raise ValueError(f"h_t: expected batch and length {tuple(h_s.shape[1:3])} (those of h_s), "
                         f"got shape {tuple(h_t.shape)}")
    if min(h_s.shape) == 0 or min(h_t.shape) == 0:
        raise ValueError(f"h_s: expected non-empty layers, batch, length and features, got {tuple(h_s.shape)} "
                         f"and h_t {tuple(h_t.shape)}")
    d_s, d_t = h_s.shape[-1], h_t.shape[-1]
    if weight is None:
        if d_s != d_t:
            raise ValueError(f"weight: needed because h_s has {d_s} features and h_t has {d_t}; "
                             f"expected shape [{d_t}, {d_s}]")
    else:
        check_float("weight", weight)
        if tuple(weight.shape) != (d_t, d_s):
            raise ValueError(f"weight: expected shape [{d_t}, {d_s}] (one projection shared by all layers), "
                             f"got {tuple(weight.shape)}")
    if bias is not None:
        check_float("bias", bias)
        if tuple(bias.shape) != (d_t,):
            raise ValueError(f"bias: expected shape [{d_t}], got {tuple(bias.shape)}")


def _check_attention(q_s, k_s, q_t, k_t) -> None:
    for name, x, side in (("q_s", q_s, "M"), ("k_s", k_s, "M"), ("q_t", q_t, "N"), ("k_t", k_t, "N")):
        check_float(name, x, 5, f"[{side}, B, H, L, d]")
    if k_s.shape != q_s.shape:
        raise ValueError(f"k_s: expected the shape of q_s {tuple(q_s.shape)}, got {tuple(k_s.shape)}")
    if k_t.shape != q_t.shape:
        raise ValueError(f"k_t: expected the shape of q_t {tuple(q_t.shape)}, got {tuple(k_t.shape)}")
    if q_t.shape[1:4] != q_s.shape[1:4]:
        raise ValueError(f"q_t: expected batch, heads and length {tuple(q_s.shape[1:4])} (those of q_s; head "
                         f"counts must match, head dims may differ), got shape {tuple(q_t.shape)}")
    if min(q_s.shape) == 0 or min(q_t.shape) == 0:
        raise ValueError(f"q_s: expected non-empty inputs, got {tuple(q_s.shape)} and q_t {tuple(q_t.shape)}")
