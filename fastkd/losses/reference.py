"""Pure-PyTorch reference implementations of every fastkd loss.

These are the ground truth the Triton kernels are tested against, and the path CPU tensors take. They are
written for clarity, not speed: the attention losses materialise the [B, H, L, L] maps. All arithmetic is in
float32 (float64 for float64 inputs); inputs are assumed validated by :mod:`fastkd.losses`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _acc_dtype(*xs: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(x.dtype == torch.float64 for x in xs) else torch.float32


def attention_scores(q: torch.Tensor, k: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """S = q·kᵀ/√d for q, k: [B, H, L, d] -> [B, H, L, L]."""
    return torch.matmul(q.to(dtype), k.to(dtype).transpose(-1, -2)) / math.sqrt(q.shape[-1])


def attention_mse(q_s, k_s, q_t, k_t, mask=None):
    dt = _acc_dtype(q_s, q_t)
    return attention_mse_maps(attention_scores(q_s, k_s, dt), attention_scores(q_t, k_t, dt), mask)


def attention_mse_maps(s_s, s_t, mask=None):
    """attention_mse on score maps [B, H, L, L] (a model's real scores, e.g. DeBERTa's)."""
    dt = _acc_dtype(s_s, s_t)
    diff = s_s.to(dt) - s_t.to(dt)
    B, H, L, _ = diff.shape
    if mask is None:
        return diff.square().mean()
    pair = (mask[:, :, None] & mask[:, None, :])[:, None]  # [B, 1, L, L]
    sq = torch.where(pair, diff.square(), diff.new_zeros(()))
    n = mask.sum(dim=1).to(dt)
    return sq.sum() / (H * n.square().sum())


def attention_kl(q_s, k_s, q_t, k_t, mask=None):
    dt = _acc_dtype(q_s, q_t)
    return attention_kl_maps(attention_scores(q_s, k_s, dt), attention_scores(q_t, k_t, dt), mask)


def attention_kl_maps(s_s, s_t, mask=None):
    """attention_kl on score maps [B, H, L, L] (a model's real scores, e.g. DeBERTa's)."""
    dt = _acc_dtype(s_s, s_t)
    s_s, s_t = s_s.to(dt), s_t.to(dt)
    B, H, L, _ = s_s.shape
    if mask is not None:
        key_pad = ~mask[:, None, None, :]
        s_s = s_s.masked_fill(key_pad, float("-inf"))
        s_t = s_t.masked_fill(key_pad, float("-inf"))
    logp_s = torch.log_softmax(s_s, dim=-1)
    logp_t = torch.log_softmax(s_t, dim=-1)
    p_t = logp_t.exp()
    # Masked keys have p_t = 0; where() keeps 0·(−inf − −inf) = NaN out of the sum.
    terms = torch.where(p_t > 0, p_t * (logp_t - logp_s), p_t.new_zeros(()))
    kl_rows = terms.sum(dim=-1)  # [B, H, L]
    if mask is None:
        return kl_rows.mean()
    valid = mask[:, None, :]
    return torch.where(valid, kl_rows, kl_rows.new_zeros(())).sum() / (H * valid.sum().to(dt))


def split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """[B, L, D] -> [B, R, L, D/R] (a view, no copy)."""
    B, L, D = x.shape
    return x.view(B, L, num_heads, D // num_heads).transpose(1, 2)


def relation_kl(x_s, x_t, num_heads, mask=None):
    rs, rt = split_heads(x_s, num_heads), split_heads(x_t, num_heads)
    return attention_kl(rs, rs, rt, rt, mask)


def hidden_mse(h_s, h_t, weight=None, bias=None, mask=None):
    dt = _acc_dtype(h_s, h_t)
    layered = h_s.dim() == 4
    if not layered:
        h_s, h_t = h_s[None], h_t[None]
        weight = None if weight is None else weight[None]
        bias = None if bias is None else bias[None]
    proj = h_s.to(dt)
    if weight is not None:
        proj = torch.einsum("kbld,ked->kble", proj, weight.to(dt))
    if bias is not None:
        proj = proj + bias.to(dt)[:, None, None, :]
    sq = (proj - h_t.to(dt)).square()  # [K, B, L, d_t]
    d_t = sq.shape[-1]
    if mask is None:
        return sq.mean()
    m = mask[None, :, :, None].to(dt)
    return (sq * m).sum() / (sq.shape[0] * mask.sum().to(dt) * d_t)


def pkd_mse(h_s, h_t):
    dt = _acc_dtype(h_s, h_t)
    s = F.normalize(h_s.to(dt), p=2, dim=-1)
    t = F.normalize(h_t.to(dt), p=2, dim=-1)
    per = (s - t).square().sum(dim=-1)  # [B] or [K, B]
    return per.mean(dim=-1).sum() if per.dim() == 2 else per.mean()


def soft_cross_entropy(logits_s, logits_t, temperature=1.0):
    dt = _acc_dtype(logits_s, logits_t)
    p_t = torch.softmax(logits_t.to(dt) / temperature, dim=-1)
    logp_s = torch.log_softmax(logits_s.to(dt) / temperature, dim=-1)
    return -(p_t * logp_s).sum(dim=-1).mean()


# ---------------------------------------------------------------- Sinkhorn / EMD (BERT-EMD)

DEFAULT_SINKHORN_EPS = 5e-3  # relative to each problem's cost scale (max |cost|)
DEFAULT_SINKHORN_ITERS = 1000  # upper bound; iteration stops earlier on the marginal tolerance
DEFAULT_SINKHORN_TOL = 1e-6  # L1 error of the row marginal


def _eps_schedule(eps: float, start: float = 1.0, factor: float = 0.5) -> list[float]:
    out, e = [], start
    while e > eps:
        out.append(e)
        e *= factor
    out.append(eps)
    return out


def sinkhorn(cost, a, b, eps=None, iters=None, tol=DEFAULT_SINKHORN_TOL):
    """Batched log-domain Sinkhorn with ε-scaling.

    cost [P, M, N], a [P, M], b [P, N] (each histogram sums to 1) -> plan [P, M, N].
    ``eps`` is relative to each problem's cost scale (max |cost|); ``iters`` bounds the total iterations.
    Runs until the row-marginal L1 error is below ``tol`` at the final ε (the column marginal is exact after
    each g-update). Computed in float64 for fidelity; the plan is returned in the cost's dtype.
    """
    eps = DEFAULT_SINKHORN_EPS if eps is None else float(eps)
    iters = DEFAULT_SINKHORN_ITERS if iters is None else int(iters)
    C = cost.detach().to(torch.float64)
    la = a.detach().to(torch.float64).clamp_min(1e-300).log()
    lb = b.detach().to(torch.float64).clamp_min(1e-300).log()
    scale = C.abs().amax(dim=(1, 2), keepdim=True).clamp_min(1e-30)  # [P, 1, 1]
    Cn = C / scale
    f = torch.zeros_like(la)
    g = torch.zeros_like(lb)
    schedule = _eps_schedule(eps)
    warm = min(20, max(1, iters // (4 * len(schedule))))  # iterations at each coarser ε
    budget = max(1, iters - warm * (len(schedule) - 1))
    for e in schedule:
        final = e == schedule[-1]
        for it in range(budget if final else warm):
            f = e * la - e * torch.logsumexp((g[:, None, :] - Cn) / e, dim=2)
            g = e * lb - e * torch.logsumexp((f[:, :, None] - Cn) / e, dim=1)
            if final and it % 10 == 9:
                rows = torch.exp((f[:, :, None] + g[:, None, :] - Cn) / e).sum(2)
                if (rows - la.exp()).abs().sum(1).max() < tol:
                    break
    plan = torch.exp((f[:, :, None] + g[:, None, :] - Cn) / schedule[-1])
    return round_to_marginals(plan, la.exp(), lb.exp()).to(cost.dtype)


def round_to_marginals(plan, a, b):
    """Project a near-feasible plan onto {F >= 0 : F·1 = a, Fᵀ·1 = b} (Altschuler, Weed & Rigollet 2017,
    Alg. 2): scale rows down to a, columns down to b, then add the rank-one remainder. Exact marginals at
    O(M·N) cost, so the loss never depends on how far Sinkhorn got."""
    x = (a / plan.sum(2).clamp_min(1e-300)).clamp(max=1.0)
    plan = plan * x[:, :, None]
    y = (b / plan.sum(1).clamp_min(1e-300)).clamp(max=1.0)
    plan = plan * y[:, None, :]
    # Clamp: rounding leaves residuals like -3e-18 whose sum, clamped to 1e-300, would blow the plan up to
    # ±1e274 (the Triton kernel clamps the same way).
    ea, eb = (a - plan.sum(2)).clamp_min(0), (b - plan.sum(1)).clamp_min(0)
    return plan + ea[:, :, None] * eb[:, None, :] / ea.sum(1).clamp_min(1e-300)[:, None, None]


def emd_loss(cost, w_s, w_t, *, eps=None, iters=None):
    """loss [P] = Σ f_ij·d_ij with the transport plan f treated as a constant; returns (loss, plan)."""
    plan = sinkhorn(cost, w_s, w_t, eps=eps, iters=iters)
    dt = _acc_dtype(cost)
    loss = (plan.to(dt) * cost.to(dt)).sum(dim=(1, 2))
    return loss, plan
