"""Encoder families: the one registry of where each transformers encoder keeps what fastkd reads.

An :class:`EncoderFamily` is a declarative description of one architecture: where its layers are, which
module's output is the embedding output (``output_hidden_states[0]``), where each layer's Q/K/V come from,
what the model does to Q and K before its scores (rotary embeddings), what it applies after the last layer
(a final LayerNorm), whether one layer module is shared by all depths (ALBERT), and which attention
implementation it needs. Capture (:mod:`fastkd.models.capture`), the trainer's checks and the recipes' term checks
read it; adding a family is one :func:`register_family` call here and its parity test (tests/test_families.py).

Attention scores. fastkd's attention losses compute softmax(q·kᵀ/√d) from captured Q and K. That is the
model's own attention only where its scores are q·kᵀ/√d (after any rotary step, which capture applies with the
model's own function): the fused path. DeBERTa's (v1 and v2) disentangled content/position terms and MPNet's
relative position bias cannot be rebuilt from Q and K, so for those families capture hands over the model's
real [B, H, L, L] scores, computed by the model's own functions (``real_scores``), and the attention losses
take their score-map form: materialised maps, the reference computation, O(B·H·L²) memory, said in the
trainer's log. BERT-EMD's attention EMD, whose cost matrices come from the fused Q/K kernels, is refused for
the real-score families.
ModernBERT's local layers attend within a sliding window: their scores are exact while a batch fits the window
(every token then sees every other), and :func:`check_window` refuses longer batches, naming the layers.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn


def _rotate_roformer(attention: nn.Module, bound: inspect.BoundArguments, q, k, v):
    """RoFormer rotates Q and K (and V with ``rotary_value``) inside its self-attention, with the sinusoidal
    positions it is called with; the model's own static method does it here too."""
    pos = bound.arguments.get("sinusoidal_pos")
    if pos is None:
        return q, k, v
    rotate = type(attention).apply_rotary_position_embeddings
    q = None if q is None else rotate(pos, q, q)[0]
    k = None if k is None else rotate(pos, k, k)[0]
    if v is not None and getattr(attention, "rotary_value", False):
        v = rotate(pos, v, v)[0]
    return q, k, v


def _rotate_modernbert(attention: nn.Module, bound: inspect.BoundArguments, q, k, v):
    """ModernBERT applies its rotary embedding (cos, sin: the ``position_embeddings`` argument) to Q and K."""
    cos, sin = bound.arguments["position_embeddings"]
    apply = sys.modules[type(attention).__module__].apply_rotary_pos_emb
    if q is not None:
        q = apply(q, q, cos, sin, unsqueeze_dim=1)[0]
    if k is not None:
        k = apply(k, k, cos, sin, unsqueeze_dim=1)[0]
    return q, k, v


def _deberta_scores(attention: nn.Module, bound: inspect.BoundArguments, q, k):
    """DeBERTa-v2's pre-mask scores, as its DisentangledSelfAttention forms them: q·kᵀ/√(d·(1 + #position
    terms)) plus its own disentangled_attention_bias (content-to-position, position-to-content). The relative
    embeddings are taken without the module's dropout: the model's own draw is not visible from outside, so
    a training-mode student's targets are its dropout-free scores (a teacher runs in eval mode: exact)."""
    B, H, L, d = q.shape
    qf, kf = q.reshape(B * H, L, d), k.reshape(B * H, L, d)
    factor = 1 + sum(t in attention.pos_att_type for t in ("c2p", "p2c"))
    scale = (torch.tensor(d, dtype=torch.float) * factor).sqrt().to(q.dtype)
    scores = torch.bmm(qf, kf.transpose(-1, -2) / scale)
    if attention.relative_attention:
        args = bound.arguments
        scores = scores + attention.disentangled_attention_bias(qf, kf, args.get("relative_pos"),
                                                                args.get("rel_embeddings"), factor)
    return scores.view(B, H, L, L)


def _deberta_v1_qkv(attention: nn.Module, t: torch.Tensor):
    """DeBERTa (v1)'s fused in_proj output [B, L, H·3d], interleaved per head ([q_h | k_h | v_h]), split as its
    DisentangledSelfAttention does, with its separate Q and V biases added."""
    B, L, _ = t.shape
    H = attention.num_attention_heads
    q, k, v = t.view(B, L, H, -1).permute(0, 2, 1, 3).chunk(3, dim=-1)
    q = q + attention.q_bias.view(H, -1)[None, :, None, :].to(q.dtype)
    v = v + attention.v_bias.view(H, -1)[None, :, None, :].to(v.dtype)
    return q, k, v


def _deberta_v1_scores(attention: nn.Module, bound: inspect.BoundArguments, q, k):
    """DeBERTa (v1)'s pre-mask scores: (q/√(d·(1 + #position terms)))·kᵀ plus its own disentangled_att_bias
    (computed from the scaled Q, as the model does), then its talking-heads projection if it has one."""
    factor = 1 + len(attention.pos_att_type)
    q = q / (torch.tensor(q.shape[-1], dtype=torch.float) * factor).sqrt().to(q.dtype)
    scores = q @ k.transpose(-1, -2)
    rel_pos, rel_emb = bound.arguments.get("relative_pos"), bound.arguments.get("rel_embeddings")
    if attention.relative_attention and rel_emb is not None and rel_pos is not None:
        scores = scores + attention.disentangled_att_bias(q, k, rel_pos, rel_emb, factor)
    if attention.head_logits_proj is not None:
        scores = attention.head_logits_proj(scores.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    return scores


def _mpnet_scores(attention: nn.Module, bound: inspect.BoundArguments, q, k):
    """MPNet's pre-mask scores: q·kᵀ/√d plus the relative-position bias its encoder passes every layer."""
    scores = q @ k.transpose(-1, -2) / (q.shape[-1] ** 0.5)
    bias = bound.arguments.get("position_bias")
    return scores if bias is None else scores + bias


def _resize_deberta(teacher_config, config) -> None:
    """DeBERTa's pooler is sized by its own attribute, the hidden size in the released models."""
    if getattr(teacher_config, "pooler_hidden_size", None) == teacher_config.hidden_size:
        config.pooler_hidden_size = config.hidden_size


def _resize_modernbert(teacher_config, config) -> None:
    """ModernBERT's per-layer attention types follow the new depth by its own rule (every n-th layer global)."""
    every = getattr(teacher_config, "global_attn_every_n_layers", None)
    if getattr(teacher_config, "layer_types", None) is not None and every:
        config.layer_types = ["full_attention" if i % every == 0 else "sliding_attention"
                              for i in range(config.num_hidden_layers)]


# How ETD cuts a layer: parameter paths inside one layer -> the part each is (fastkd.models.encoder.LayerParts), whose
# rows/columns ETD slices by kept heads, head dims, FFN units and hidden dims. A part may have several paths
# (DeBERTa's position projections are cut as its query and key); the first names the LayerParts module. Fused
# parts: "qkv" ([q | k | v] rows), "qkv_interleaved" ([q_h | k_h | v_h] per head, DeBERTa v1), "ffn_in_glu"
# ([input | gate] halves), "qv_bias" (a module's own q_bias / v_bias parameters).
BERT_LAYER_PARAMS = {
    "attention.self.query": "query", "attention.self.key": "key", "attention.self.value": "value",
    "attention.output.dense": "attn_out", "attention.output.LayerNorm": "attn_norm",
    "intermediate.dense": "ffn_in", "output.dense": "ffn_out", "output.LayerNorm": "out_norm",
}


@dataclass(frozen=True)
class EncoderFamily:
    """Paths are dotted attribute paths: ``layers``, ``embeddings``, ``final_norm`` and ``shared_layer`` under the
    base model, the others under one layer. ``embeddings`` may list alternatives ("a|b": the first present)."""

    name: str
    model_types: tuple[str, ...]
    layers: str = "encoder.layer"
    embeddings: str = "embeddings"
    q: str | None = "attention.self.query"
    k: str | None = "attention.self.key"
    v: str | None = "attention.self.value"
    fused_qkv: str | None = None  # one Linear giving [q | k | v] (ModernBERT's Wqkv)
    split_qkv: Callable | None = None  # (attention module, fused output) -> q, k, v [B, H, L, d] when not [q|k|v]
    attention: str = "attention.self"  # the module whose call arguments a rotary step needs
    rotate: Callable | None = None  # (attention module, its bound call arguments, q, k, v) -> (q, k, v)
    real_scores: Callable | None = None  # (attention module, bound arguments, q, k) -> the model's [B, H, L, L]
    final_norm: str | None = None  # applied after the last layer: output_hidden_states[-1] is its output
    shared_layer: str | None = None  # one module run num_hidden_layers times (ALBERT)
    heads: str = "num_attention_heads"  # the config attribute holding the head count
    ffn: str = "intermediate_size"  # the config attribute holding the FFN width
    resizable: bool = True  # a config copy with other sizes is a valid model (MobileBERT's bottlenecks: no)
    attn_implementation: str = "sdpa"  # what the model is loaded with (eager where it has no SDPA path)
    layer_params: dict[str, str] | None = None  # how ETD cuts a layer (None: ETD is not defined, see etd_refusal)
    etd_refusal: str | None = None  # why ETD is not defined for this family
    rotary_head_dim: bool = False  # ETD must keep the head dim (rotary frequencies depend on it)
    etd_layers: str | None = None  # the layer list ETD cuts when it is not ``layers`` (ALBERT: the shared one)
    shared_heads: dict[str, int] | None = None  # per-head tables all layers share (state-dict suffix -> head axis):
    # ETD then keeps the same heads in every layer and slices these (MPNet's relative-position bias)
    positions_after_pad: bool = False  # position ids start after the pad id (RoBERTa-style): fewer usable positions
    resize: Callable | None = None  # (teacher config, resized copy) -> None: what else follows a new size

    def max_positions(self, config) -> int | None:
        """Tokens per example the position embeddings hold."""
        positions = getattr(config, "max_position_embeddings", None)
        if positions is not None and self.positions_after_pad:
            positions -= (config.pad_token_id or 0) + 1
        return positions

    def check_layout(self, config, who: str) -> None:
        """What fastkd captures and cuts must be what the model runs: ALBERT's one shared layer of the released
        models (one group, one inner layer)."""
        groups = (getattr(config, "num_hidden_groups", 1), getattr(config, "inner_group_num", 1))
        if self.shared_layer and groups != (1, 1):
            raise ValueError(f"{who}: ALBERT with num_hidden_groups={groups[0]} and inner_group_num={groups[1]}: "
                             f"fastkd captures and cuts the one shared layer of the released ALBERTs (1 and 1)")

    @property
    def etd(self) -> bool:
        return self.layer_params is not None

    @property
    def scores_from_qk(self) -> bool:
        """Whether the model's attention scores are q·kᵀ/√d of the captured Q and K (the fused path)."""
        return self.real_scores is None


FAMILIES: dict[str, EncoderFamily] = {}


def register_family(family: EncoderFamily) -> EncoderFamily:
    for other in FAMILIES.values():
        if set(other.model_types) & set(family.model_types):
            raise ValueError(f"family {family.name}: model_type already registered by {other.name}")
    FAMILIES[family.name] = family
    return family


for _name, _after_pad in (("bert", False), ("roberta", True), ("xlm-roberta", True), ("camembert", True),
                          ("ernie", False), ("data2vec-text", True)):  # data2vec-text's positions are RoBERTa's
    register_family(EncoderFamily(_name, (_name,), layer_params=BERT_LAYER_PARAMS, positions_after_pad=_after_pad))
register_family(EncoderFamily("electra", ("electra",), embeddings="embeddings_project|embeddings",
                              layer_params=BERT_LAYER_PARAMS))
register_family(EncoderFamily("mobilebert", ("mobilebert",), resizable=False,
                              etd_refusal="its bottleneck and stacked-FFN widths are tied to the hidden size"))
register_family(EncoderFamily(
    "megatron-bert", ("megatron-bert",), final_norm="encoder.ln", attn_implementation="eager",
    layer_params={"attention.ln": "attn_norm", "attention.self.query": "query", "attention.self.key": "key",
                  "attention.self.value": "value", "attention.output.dense": "attn_out", "ln": "out_norm",
                  "intermediate.dense": "ffn_in", "output.dense": "ffn_out"}))  # pre-LN: norms before each block
register_family(EncoderFamily("roformer", ("roformer",), rotate=_rotate_roformer, attn_implementation="eager",
                              layer_params=BERT_LAYER_PARAMS, rotary_head_dim=True))
register_family(EncoderFamily(
    "distilbert", ("distilbert",), layers="transformer.layer", q="attention.q_lin", k="attention.k_lin",
    v="attention.v_lin", attention="attention", heads="n_heads", ffn="hidden_dim",
    layer_params={"attention.q_lin": "query", "attention.k_lin": "key", "attention.v_lin": "value",
                  "attention.out_lin": "attn_out", "sa_layer_norm": "attn_norm", "ffn.lin1": "ffn_in",
                  "ffn.lin2": "ffn_out", "output_layer_norm": "out_norm"}))
register_family(EncoderFamily(
    "albert", ("albert",), layers="encoder.albert_layer_groups", embeddings="encoder.embedding_hidden_mapping_in",
    shared_layer="encoder.albert_layer_groups.0.albert_layers.0", q="attention.query", k="attention.key",
    v="attention.value", attention="attention", etd_layers="encoder.albert_layer_groups.0.albert_layers",
    # ETD cuts the one shared layer once (heads, FFN units and hidden dims by importance summed over every depth
    # it runs at); the student runs it num_layers times.
    layer_params={"attention.query": "query", "attention.key": "key", "attention.value": "value",
                  "attention.dense": "attn_out", "attention.LayerNorm": "attn_norm", "ffn": "ffn_in",
                  "ffn_output": "ffn_out", "full_layer_layer_norm": "out_norm"}))
register_family(EncoderFamily(
    "modernbert", ("modernbert",), layers="layers", q=None, k=None, v=None, fused_qkv="attn.Wqkv",
    attention="attn", rotate=_rotate_modernbert, final_norm="final_norm", rotary_head_dim=True,
    resize=_resize_modernbert,
    layer_params={"attn_norm": "attn_norm", "attn.Wqkv": "qkv", "attn.Wo": "attn_out", "mlp_norm": "out_norm",
                  "mlp.Wi": "ffn_in_glu", "mlp.Wo": "ffn_out"}))
register_family(EncoderFamily(
    "deberta-v2", ("deberta-v2",), q="attention.self.query_proj", k="attention.self.key_proj",
    v="attention.self.value_proj", attn_implementation="eager", real_scores=_deberta_scores, resize=_resize_deberta,
    layer_params={"attention.self.query_proj": "query", "attention.self.key_proj": "key",
                  "attention.self.value_proj": "value", "attention.self.pos_query_proj": "query",
                  "attention.self.pos_key_proj": "key", "attention.output.dense": "attn_out",
                  "attention.output.LayerNorm": "attn_norm", "intermediate.dense": "ffn_in",
                  "output.dense": "ffn_out", "output.LayerNorm": "out_norm"}))
register_family(EncoderFamily(
    "deberta", ("deberta",), q=None, k=None, v=None, fused_qkv="attention.self.in_proj", split_qkv=_deberta_v1_qkv,
    attn_implementation="eager", real_scores=_deberta_v1_scores, resize=_resize_deberta,
    layer_params={"attention.self.in_proj": "qkv_interleaved", "attention.self": "qv_bias",
                  "attention.self.pos_proj": "key", "attention.self.pos_q_proj": "query",
                  "attention.output.dense": "attn_out", "attention.output.LayerNorm": "attn_norm",
                  "intermediate.dense": "ffn_in", "output.dense": "ffn_out", "output.LayerNorm": "out_norm"}))
register_family(EncoderFamily(
    "mpnet", ("mpnet",), q="attention.attn.q", k="attention.attn.k", v="attention.attn.v",
    attention="attention.attn", attn_implementation="eager", real_scores=_mpnet_scores,
    layer_params={"attention.attn.q": "query", "attention.attn.k": "key", "attention.attn.v": "value",
                  "attention.attn.o": "attn_out", "attention.LayerNorm": "attn_norm", "intermediate.dense": "ffn_in",
                  "output.dense": "ffn_out", "output.LayerNorm": "out_norm"},
    shared_heads={"encoder.relative_attention_bias.weight": 1}))


def find_family(config) -> EncoderFamily | None:
    """The registered family of a config's model_type, or None."""
    model_type = getattr(config, "model_type", None)
    return next((f for f in FAMILIES.values() if model_type in f.model_types), None)


def has_real_scores(config) -> bool:
    """Whether a model's attention losses read its real score maps (DeBERTa, MPNet) instead of Q and K."""
    family = find_family(config)
    return family is not None and family.real_scores is not None


def etd_model_types() -> tuple[str, ...]:
    """The model types ETD can cut: those whose family gives a layer map (read at each call)."""
    return tuple(t for f in FAMILIES.values() if f.etd for t in f.model_types)


def supported() -> str:
    return ", ".join(sorted(t for f in FAMILIES.values() for t in f.model_types))


def family_of(model_or_config, what: str = "model") -> EncoderFamily:
    """The family of a transformers model or config; a ValueError naming the model_type and the supported ones
    otherwise (never an AttributeError from deep inside capture)."""
    cfg = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(cfg, "model_type", None)
    for family in FAMILIES.values():
        if model_type in family.model_types:
            if getattr(cfg, "is_decoder", False) or getattr(cfg, "add_cross_attention", False):
                raise ValueError(f"{what}: expected an encoder; decoders and cross-attention are not supported")
            return family
    raise ValueError(f"{what}: model_type {model_type!r} is not a supported encoder family; supported: {supported()}")


def module_at(root: nn.Module, path: str) -> nn.Module:
    """The submodule at a dotted path (``a.b.0.c``); with "a|b" alternatives the first one present."""
    for option in path.split("|"):
        mod = root
        try:
            for part in option.split("."):
                mod = mod[int(part)] if part.isdigit() else getattr(mod, part)
        except (AttributeError, IndexError):
            continue
        if isinstance(mod, nn.Module):
            return mod
    raise ValueError(f"model: expected a submodule at {path!r} ({type(root).__name__})")


def base_model(model: nn.Module) -> nn.Module:
    return getattr(model, "base_model", model)


def num_heads(config) -> int:
    family = find_family(config)
    return getattr(config, family.heads if family else "num_attention_heads")


def ffn_size(config) -> int:
    family = find_family(config)
    return getattr(config, family.ffn if family else "intermediate_size")


def layer_module(model: nn.Module, family: EncoderFamily, i: int) -> nn.Module:
    """The module that computes layer i (ALBERT: the shared one, for every i)."""
    base = base_model(model)
    if family.shared_layer:
        return module_at(base, family.shared_layer)
    return module_at(base, family.layers)[i]


def sliding_windows(config) -> dict[int, int]:
    """{layer: longest sequence its sliding window leaves whole} for ModernBERT's local layers; {} elsewhere.
    A local layer masks keys more than ``local_attention // 2`` positions away, so up to that many + 1 tokens
    every query still sees every key and the scores are exactly q·kᵀ/√d."""
    types = getattr(config, "layer_types", None) or []
    half = getattr(config, "local_attention", 0) // 2
    return {i: half + 1 for i, t in enumerate(types) if t == "sliding_attention"}


def check_window(config, layers: list[int], length: int, terms: str) -> None:
    """Refuse attention-score terms on windowed layers for a batch longer than the window."""
    limits = sliding_windows(config)
    bad = [i for i in layers if i in limits and length > limits[i]]
    if bad:
        raise ValueError(
            f"{terms}: {config.model_type} layers {bad} attend within a sliding window of ±{limits[bad[0]] - 1} "
            f"tokens, and this batch has {length}; attention-score terms there would use scores the model does "
            f"not use. Map the term onto global layers "
            f"({[i for i in range(config.num_hidden_layers) if i not in limits]}) or keep sequences to at most "
            f"{min(limits[i] for i in bad)} tokens (--max-length)")


def attention_interface(config) -> str | None:
    """The attention implementation fastkd loads a model of this config with; None (transformers' own choice)
    for a model outside the registry, which only method kd (logits alone) can use."""
    family = find_family(config)
    return None if family is None else family.attn_implementation


def as_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, L, H·d] -> [B, H, L, d] (a view)."""
    B, L, D = t.shape
    return t.view(B, L, heads, D // heads).transpose(1, 2)
