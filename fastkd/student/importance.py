"""ETD importance (DynaBERT's first-order scores): head and FFN gates, and the per-unit scores over data."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from fastkd.models.encoder import LayerParts, check_encoder, encoder_layers, is_norm, model_layer_parts
from fastkd.models.families import ffn_size

OBJECTIVES = ("auto", "task", "sensitivity")
_MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids")


# ---------------------------------------------------------------- gates (head mask / FFN mask)


def _gate_tensor(name: str, gates: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    if not isinstance(gates, torch.Tensor) or tuple(gates.shape) != (rows, cols):
        shape = tuple(gates.shape) if isinstance(gates, torch.Tensor) else type(gates).__name__
        raise ValueError(f"{name}: expected a tensor of shape [num_layers, {cols}] = [{rows}, {cols}], got {shape}")
    return gates


@contextlib.contextmanager
def head_gates(model: nn.Module, gates: torch.Tensor) -> Iterator[None]:
    """Multiply each head's attention context by ``gates[layer, head]`` inside the ``with`` block: transformers
    5 dropped ``head_mask``, so this is its replacement (0/1 gates = a head mask; gates requiring grad give
    DynaBERT's head importance). A forward pre-hook on each attention-output dense layer scales its input."""
    cfg, layers = check_encoder(model), encoder_layers(model)
    heads = cfg.num_attention_heads
    gates = _gate_tensor("gates", gates, len(layers), heads)
    handles = []

    def make(i):
        def pre_hook(_mod, args):
            ctx = args[0]
            g = gates[i].to(ctx.dtype)
            gated = (ctx.unflatten(-1, (heads, -1)) * g[:, None]).flatten(-2)
            return (gated, *args[1:])

        return pre_hook

    try:
        for i, parts in enumerate(model_layer_parts(model)):
            handles.append(parts.attn_out.register_forward_pre_hook(make(i)))
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def ffn_gates(model: nn.Module, gates: torch.Tensor) -> Iterator[None]:
    """Multiply each FFN neuron's activation by ``gates[layer, neuron]`` (0 = the neuron removed)."""
    cfg, layers = check_encoder(model), encoder_layers(model)
    gates = _gate_tensor("gates", gates, len(layers), ffn_size(cfg))
    handles = []

    def make(i):
        def pre_hook(_mod, args):
            return (args[0] * gates[i].to(args[0].dtype), *args[1:])

        return pre_hook

    try:
        for i, parts in enumerate(model_layer_parts(model)):
            handles.append(parts.ffn_out.register_forward_pre_hook(make(i)))
        yield
    finally:
        for h in handles:
            h.remove()


# ---------------------------------------------------------------- importance


@dataclass
class Importance:
    """Per-unit scores of a teacher (higher = keep). Shapes: head [n, H], ffn [n, F], hidden [D],
    qk_dim / v_dim [n, H, d] (per-head dims)."""

    head: torch.Tensor
    ffn: torch.Tensor
    hidden: torch.Tensor
    qk_dim: torch.Tensor
    v_dim: torch.Tensor
    objective: str = ""
    num_batches: int = 0


def _model_inputs(batch: Mapping, device) -> dict:
    return {k: batch[k].to(device) for k in _MODEL_INPUTS if k in batch and batch[k] is not None}


def _labels(batch: Mapping):
    for k in ("labels", "label"):
        if k in batch and batch[k] is not None:
            return batch[k]
    return None


def _objective_loss(objective: str, out, batch: Mapping, inputs: dict, gen: torch.Generator) -> torch.Tensor:
    logits = getattr(out, "logits", None)
    if objective == "task":
        labels = _labels(batch)
        if logits is None or labels is None:
            raise ValueError("objective: 'task' needs a model with a task head (logits) and 'labels' in every batch")
        labels = labels.to(logits.device)
        if logits.shape[-1] == 1 and labels.is_floating_point():
            return nn.functional.mse_loss(logits.squeeze(-1).float(), labels.float())
        return nn.functional.cross_entropy(logits.float().flatten(0, -2), labels.flatten().long())
    # "sensitivity": a random projection of the output; see the module docstring.
    f = logits if logits is not None else out.last_hidden_state
    r = torch.randn(f.shape, generator=gen, dtype=torch.float32).to(f.device)
    prod = f.float() * r
    if logits is None and "attention_mask" in inputs:
        valid = inputs["attention_mask"].to(prod.dtype)[..., None]
        return (prod * valid).sum() / valid.sum().clamp_min(1).sqrt()
    return prod.sum() / math.sqrt(max(1, f.shape[:-1].numel()))


def _row_score(wg: torch.Tensor, bg: torch.Tensor | None) -> torch.Tensor:
    """|Σ_cols w·g + b·g| per output row of a Linear (w·g and b·g given)."""
    s = wg.sum(dim=1)
    return (s + bg if bg is not None else s).abs()


def hidden_axes(model: nn.Module, hidden: int) -> list[tuple[nn.Parameter, int, nn.Parameter | None]]:
    """(parameter, axis carrying the hidden dim, bias paired with that axis) for every parameter outside the
    encoder layers whose module has the hidden size on that axis: embeddings, their LayerNorm, ELECTRA's
    embedding projection, the pooler and task heads."""
    layer_params = {id(p) for layer in encoder_layers(model) for p in layer.parameters()}
    seen, axes = set(), []
    for mod in model.modules():
        own = [p for p in mod.parameters(recurse=False) if id(p) not in layer_params]
        if not own:
            continue
        items = []
        if isinstance(mod, nn.Embedding) and mod.embedding_dim == hidden:
            items.append((mod.weight, 1, None))
        elif is_norm(mod) and tuple(mod.weight.shape) == (hidden,):
            items.append((mod.weight, 0, getattr(mod, "bias", None)))
        elif isinstance(mod, nn.Linear):
            if mod.in_features == hidden:
                items.append((mod.weight, 1, None))
            if mod.out_features == hidden:
                items.append((mod.weight, 0, mod.bias))
        for p, axis, b in items:
            if p is not None and (id(p), axis) not in seen:
                seen.add((id(p), axis))
                axes.append((p, axis, b))
    return axes


def _batch_scores(layers: list[LayerParts], outer: list, gate_grad: torch.Tensor, g_of: dict, n: int, F: int,
                  D: int, device) -> dict[str, torch.Tensor]:
    """One batch's importance scores from the gate gradient and the parameter gradients (by parameter id)."""

    def wg(p):  # w·∂L/∂w in fp32 (zeros when the parameter took no part; None for a missing bias)
        if p is None:
            return None
        g = g_of.get(id(p))
        return torch.zeros_like(p, dtype=torch.float32) if g is None else p.detach().float() * g.float()

    def wg_qkv(lp):  # (q_w, q_b, k_w, k_b, v_w, v_b), a fused Linear split by its layout
        if not lp.qkv_layout:
            return (wg(lp.query.weight), wg(lp.query.bias), wg(lp.key.weight), wg(lp.key.bias),
                    wg(lp.value.weight), wg(lp.value.bias))
        w, b = wg(lp.query.weight), wg(lp.query.bias)
        if lp.qkv_layout == "interleaved":  # [q_h | k_h | v_h] per head -> the three in head order
            w = w.view(lp.heads, 3, -1, w.shape[-1]).transpose(0, 1).reshape(w.shape)
            b = None if b is None else b.view(lp.heads, 3, -1).transpose(0, 1).reshape(b.shape)
        w, b = w.chunk(3), (None,) * 3 if b is None else b.chunk(3)
        return w[0], b[0], w[1], b[1], w[2], b[2]

    score = dict(head=gate_grad.detach().abs().float(), ffn=torch.zeros(n, F, device=device),
                 hidden=torch.zeros(D, device=device), qk_dim=torch.zeros(n, D, device=device),
                 v_dim=torch.zeros(n, D, device=device))
    for i, lp in enumerate(layers):
        q_w, q_b, k_w, k_b, v_w, v_b = wg_qkv(lp)
        ao_w, ao_b = wg(lp.attn_out.weight), wg(lp.attn_out.bias)
        fi_w, fi_b = wg(lp.ffn_in.weight), wg(lp.ffn_in.bias)
        fo_w, fo_b = wg(lp.ffn_out.weight), wg(lp.ffn_out.bias)
        score["qk_dim"][i] = _row_score(q_w, q_b) + _row_score(k_w, k_b)
        score["v_dim"][i] = _row_score(v_w, v_b) + ao_w.sum(dim=0).abs()
        if lp.glu:  # a GeGLU unit is a row in each half of ffn_in
            halves = zip(fi_w.chunk(2), (None, None) if fi_b is None else fi_b.chunk(2), strict=True)
            score["ffn"][i] = sum(_row_score(w, b) for w, b in halves) + fo_w.sum(dim=0).abs()
        else:
            score["ffn"][i] = _row_score(fi_w, fi_b) + fo_w.sum(dim=0).abs()
        h = score["hidden"]
        for w in (q_w, k_w, v_w, fi_w):  # input columns
            h += w.sum(dim=0).abs()
        h += _row_score(ao_w, ao_b) + _row_score(fo_w, fo_b)  # output rows with their bias
        for norm in (lp.attn_norm, lp.out_norm):
            if is_norm(norm):
                w, b = wg(norm.weight), wg(getattr(norm, "bias", None))
                h += (w if b is None else w + b).abs()
    for p, axis, b in outer:
        w = wg(p)
        s = w.sum(dim=1 - axis) if w.dim() == 2 else w
        if b is not None:
            s = s + wg(b)
        score["hidden"] += s.abs()
    return score


def compute_importance(teacher: nn.Module, data: Iterable[Mapping], *, num_batches: int = 64,
                       objective: str = "auto", seed: int = 0) -> Importance:
    """DynaBERT-style importance of every head, FFN neuron, per-head dim and hidden dim over at most
    ``num_batches`` batches of ``data`` (dicts with input_ids, attention_mask, optional token_type_ids and
    labels). One pass, no parameter update; the teacher's mode and requires_grad flags are restored."""
    cfg = check_encoder(teacher)
    if objective not in OBJECTIVES:
        raise ValueError(f"objective: expected one of {OBJECTIVES}, got {objective!r}")
    if isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 1:
        raise ValueError(f"num_batches: expected a positive int, got {num_batches!r}")
    if data is None:
        raise ValueError("data: strategy 'impt' needs an iterable of batches (dicts of input_ids, attention_mask)")
    layers = model_layer_parts(teacher)
    n, H, D, F = len(layers), cfg.num_attention_heads, cfg.hidden_size, ffn_size(cfg)
    d = D // H
    device = next(teacher.parameters()).device
    acc = dict(head=torch.zeros(n, H), ffn=torch.zeros(n, F), hidden=torch.zeros(D), qk_dim=torch.zeros(n, D),
               v_dim=torch.zeros(n, D))
    outer = hidden_axes(teacher, D)
    params = list(teacher.parameters())
    flags = [p.requires_grad for p in params]
    was_training = teacher.training
    gen = torch.Generator().manual_seed(seed)
    used, chosen = 0, objective
    try:
        teacher.eval()
        for p in params:
            p.requires_grad_(True)
        for batch in data:
            if used >= num_batches:
                break
            if not isinstance(batch, Mapping) or "input_ids" not in batch:
                raise ValueError(f"data: expected batches that are dicts with 'input_ids', got {type(batch).__name__}")
            inputs = _model_inputs(batch, device)
            gates = torch.ones(n, H, device=device, requires_grad=True)
            with head_gates(teacher, gates):
                out = teacher(**inputs)
            if chosen == "auto":
                chosen = "task" if getattr(out, "logits", None) is not None and _labels(batch) is not None \
                    else "sensitivity"
            loss = _objective_loss(chosen, out, batch, inputs, gen)
            grads = torch.autograd.grad(loss, [gates, *params], allow_unused=True)
            score = _batch_scores(layers, outer, grads[0], dict(zip(map(id, params), grads[1:], strict=True)),
                                  n, F, D, device)
            for k, v in score.items():
                if not bool(torch.isfinite(v).all()):
                    raise ValueError(f"data: batch {used} gave non-finite {k} importance (loss "
                                     f"{float(loss.detach())}); check the inputs and the teacher's dtype")
                acc[k] += v.cpu()
            used += 1
    finally:
        for p, f in zip(params, flags, strict=True):
            p.requires_grad_(f)
        teacher.train(was_training)
    if used == 0:
        raise ValueError("data: expected at least one batch, got an empty iterable")
    return Importance(head=acc["head"], ffn=acc["ffn"], hidden=acc["hidden"], qk_dim=acc["qk_dim"].view(n, H, d),
                      v_dim=acc["v_dim"].view(n, H, d), objective=chosen, num_batches=used)


