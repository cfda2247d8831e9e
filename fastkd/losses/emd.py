"""BERT-EMD helpers that are not losses: the cost-attention layer-weight update.

BERT-EMD (lxk00/BERT-EMD, ``get_new_layer_weight``) re-weights layers after every step from the transport plan f
and the cost matrix d of that step:

    c_i = Σ_j f_ij·d_ij        (what student layer i paid)
    w̄_i = c_i / w_i            (cost per unit of its weight)
    w_i ∝ (Σ_k w̄_k) / w̄_i      normalised to sum 1

and the same for the teacher side over the columns (c_j = Σ_i f_ij·d_ij). As in that code, a layer whose w̄ is
0 (it paid nothing) gets weight 0 rather than an infinite one. If every w̄ of a side is 0 (e.g. a zero cost
matrix) the previous weights are kept instead of dividing 0 by 0. Pure tensor ops, batched, no host sync.
"""

from __future__ import annotations

import torch
from torch import nn

from fastkd.losses.checks import check_float, check_same_device

__all__ = ["EMDState", "update_layer_weights"]


class EMDState(nn.Module):
    """BERT-EMD's state across steps, shared by its attention and hidden kinds: the layer weights (buffers, so
    they move, checkpoint and resume with the loss module), the last step's plans and costs for the update, and
    the recipe's Sinkhorn settings."""

    def __init__(self, shapes, params):
        super().__init__()
        n_s, n_t = shapes.student_layers, shapes.teacher_layers
        self.register_buffer("w_s", torch.full((n_s,), 1.0 / n_s))
        self.register_buffer("w_t", torch.full((n_t,), 1.0 / n_t))
        self.last: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.eps = getattr(params, "sinkhorn_eps", None)
        self.iters = getattr(params, "sinkhorn_iters", None)


def _side(c: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    zero = c.new_zeros(())
    w_bar = torch.where(w > 0, c / torch.where(w > 0, w, 1), zero)
    total = w_bar.sum(-1, keepdim=True)
    new = torch.where(w_bar > 0, total / torch.where(w_bar > 0, w_bar, 1), zero)
    norm = new.sum(-1, keepdim=True)
    return torch.where(norm > 0, new / torch.where(norm > 0, norm, 1), w)


def update_layer_weights(plan: torch.Tensor, cost: torch.Tensor, w_s: torch.Tensor, w_t: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """New (w_s [.., M], w_t [.., N]) from plan and cost [.., M, N] (a leading batch dim P is optional).

    Computed in float32 (float64 for float64 inputs), returned in w_s's / w_t's dtype; no gradient flows
    (the weights are bookkeeping, not parameters)."""
    check_float("plan", plan, (2, 3), "[M, N] or [P, M, N]")
    check_float("cost", cost, (2, 3), "[M, N] or [P, M, N]")
    check_float("w_s", w_s, (1, 2), "[M] or [P, M]")
    check_float("w_t", w_t, (1, 2), "[N] or [P, N]")
    check_same_device(plan=plan, cost=cost, w_s=w_s, w_t=w_t)
    if cost.shape != plan.shape:
        raise ValueError(f"cost: expected the shape of plan {tuple(plan.shape)}, got {tuple(cost.shape)}")
    if tuple(w_s.shape) != tuple(plan.shape[:-1]):
        raise ValueError(f"w_s: expected shape {tuple(plan.shape[:-1])}, got {tuple(w_s.shape)}")
    if tuple(w_t.shape) != (*plan.shape[:-2], plan.shape[-1]):
        raise ValueError(f"w_t: expected shape {(*plan.shape[:-2], plan.shape[-1])}, got {tuple(w_t.shape)}")
    dt = torch.float64 if torch.float64 in (plan.dtype, cost.dtype, w_s.dtype, w_t.dtype) else torch.float32
    with torch.no_grad():
        paid = plan.detach().to(dt) * cost.detach().to(dt)
        new_s = _side(paid.sum(-1), w_s.detach().to(dt))
        new_t = _side(paid.sum(-2), w_t.detach().to(dt))
    return new_s.to(w_s.dtype), new_t.to(w_t.dtype)
