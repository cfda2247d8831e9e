"""The parts of an encoder layer ETD cuts (by its family's layer map, fastkd.models.families), and the student config
derived from a teacher's; shared by ETD and its importance pass."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from fastkd.models.families import base_model, etd_model_types, family_of, ffn_size, module_at

# The families ETD extracts from: those whose family gives a layer map (fastkd.models.families, layer_params).


# ---------------------------------------------------------------- model structure


def encoder_layers(model: nn.Module) -> nn.ModuleList:
    family = family_of(model, "teacher")
    layers = module_at(base_model(model), family.etd_layers or family.layers)  # ALBERT: its one shared layer
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"teacher: expected the layer list at {family.layers}, got {type(layers).__name__}")
    return layers


@dataclass
class LayerParts:
    query: nn.Linear
    key: nn.Linear
    value: nn.Linear
    attn_out: nn.Linear
    attn_norm: nn.Module  # a LayerNorm, or Identity (ModernBERT's first layer has none)
    ffn_in: nn.Linear
    ffn_out: nn.Linear
    out_norm: nn.Module
    qkv_layout: str = ""  # "" (three Linears), "thirds" ([q | k | v]) or "interleaved" ([q_h | k_h | v_h])
    glu: bool = False  # ffn_in is [input half | gate half]
    heads: int = 0  # the layer's head count (to split an interleaved layout)


def is_norm(mod: nn.Module) -> bool:
    """A LayerNorm: torch's, or a model's own (DeBERTa's DebertaLayerNorm: weight and bias over the features)."""
    return isinstance(mod, nn.LayerNorm) or (type(mod).__name__.endswith("LayerNorm")
                                             and isinstance(getattr(mod, "weight", None), torch.Tensor))


def layer_params(model: nn.Module) -> dict[str, str]:
    """Parameter paths inside one of ``model``'s layers -> the LayerParts part ETD cuts them as."""
    return family_of(model, "teacher").layer_params or {}


def layer_parts(layer: nn.Module, params: dict[str, str], heads: int = 0) -> LayerParts:
    """The layer's parts by the family's map (the first path of each part; a fused "qkv" or "qkv_interleaved"
    path serves as query, key and value, an "ffn_in_glu" one as ffn_in; "qv_bias" modules are not parts). A
    later path of a part already found may be absent: DeBERTa's position projections exist only for the
    position terms its config enables, and not at all with shared keys (DeBERTa-v3's share_att_key)."""
    found = {}
    for path, part in params.items():
        if part == "qv_bias":
            continue
        names = (("query", "key", "value") if part in ("qkv", "qkv_interleaved") else ("ffn_in",)
                 if part == "ffn_in_glu" else (part,))
        try:
            mod = module_at(layer, path)
        except ValueError as e:
            if all(name in found for name in names):
                continue
            raise ValueError(f"teacher: unsupported encoder layer {type(layer).__name__}: no {path}") from e
        for name in names:
            found.setdefault(name, mod)
    values = set(params.values())
    layout = "thirds" if "qkv" in values else "interleaved" if "qkv_interleaved" in values else ""
    parts = LayerParts(**found, qkv_layout=layout, glu="ffn_in_glu" in values, heads=heads)
    for name in ("query", "key", "value", "attn_out", "ffn_in", "ffn_out", "attn_norm", "out_norm"):
        mod = getattr(parts, name)
        ok = (is_norm(mod) or isinstance(mod, nn.Identity)) if name.endswith("norm") else isinstance(mod, nn.Linear)
        if not ok:
            raise ValueError(f"teacher: layer part {name} is {type(mod).__name__}, expected "
                             f"{'a LayerNorm or Identity' if name.endswith('norm') else 'a Linear'}")
    return parts


def _fields(obj) -> dict:
    return {f: getattr(obj, f) for f in obj.__dataclass_fields__}


def check_encoder(teacher) -> object:
    cfg = getattr(teacher, "config", None)
    if not isinstance(teacher, nn.Module) or cfg is None:
        raise ValueError(f"teacher: expected a transformers BERT-family model, got {type(teacher).__name__}")
    family = family_of(cfg, "teacher")
    if not family.etd:
        raise ValueError(f"teacher: ETD is defined here for {', '.join(etd_model_types())}; not for a "
                         f"{cfg.model_type} model: {family.etd_refusal}. Use --etd none (a randomly initialised "
                         f"student of the teacher's class) or --student DIR (a pretrained student of any supported "
                         f"family)")
    if getattr(cfg, "position_embedding_type", "absolute") not in (None, "absolute"):
        raise ValueError(f"teacher: expected absolute position embeddings, got {cfg.position_embedding_type!r}")
    family.check_layout(cfg, "teacher")
    layers = encoder_layers(teacher)
    if len(layers) != (1 if family.shared_layer else cfg.num_hidden_layers):
        raise ValueError(f"teacher: has {len(layers)} layer modules but config says {cfg.num_hidden_layers}")
    model_layer_parts(teacher)  # each layer has every part ETD cuts
    return cfg


def model_layer_parts(model: nn.Module) -> list[LayerParts]:
    """Every layer module's parts, by the model's family map."""
    params, heads = layer_params(model), model.config.num_attention_heads
    return [layer_parts(layer, params, heads) for layer in encoder_layers(model)]


def _positive_int(name: str, value, upper: int, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name}: expected a positive int, got {value!r}")
    if value < 1:
        raise ValueError(f"{name}: expected a positive int (at least 1), got {value}")
    if value > upper:
        raise ValueError(f"{name}: expected at most the teacher's {what} ({upper}), got {value}")
    return value


def student_config(teacher, *, num_layers: int, hidden_size: int, num_heads: int, intermediate_size: int):
    """The student's config for ETD: :func:`resized_config` of the teacher's, validated (no axis larger than the
    teacher's, since every student unit is a kept teacher unit)."""
    cfg_t = check_encoder(teacher) if isinstance(teacher, nn.Module) else teacher
    _positive_int("num_layers", num_layers, cfg_t.num_hidden_layers, "num_hidden_layers")
    _positive_int("hidden_size", hidden_size, cfg_t.hidden_size, "hidden_size")
    _positive_int("num_heads", num_heads, cfg_t.num_attention_heads, "num_attention_heads")
    _positive_int("intermediate_size", intermediate_size, ffn_size(cfg_t), "FFN width")
    if hidden_size % num_heads:
        raise ValueError(f"hidden_size: expected a multiple of num_heads={num_heads}, got {hidden_size}")
    d_t = cfg_t.hidden_size // cfg_t.num_attention_heads
    if family_of(cfg_t, "teacher").rotary_head_dim and hidden_size // num_heads != d_t:
        raise ValueError(f"hidden_size: a {cfg_t.model_type} teacher's rotary positions depend on the head dim "
                         f"({d_t}), so ETD keeps it: choose hidden_size = {d_t} x num_heads "
                         f"({d_t * num_heads}), got {hidden_size}")
    emb_t = getattr(cfg_t, "embedding_size", None)
    if emb_t is not None and emb_t != cfg_t.hidden_size and hidden_size == emb_t:
        raise ValueError(
            f"hidden_size: this teacher projects embeddings ({emb_t}) to its hidden size ({cfg_t.hidden_size}); "
            f"a student hidden_size equal to embedding_size={emb_t} would drop that projection, choose another")
    return resized_config(cfg_t, num_layers=num_layers, hidden_size=hidden_size, num_heads=num_heads,
                          intermediate_size=intermediate_size)


def resized_config(cfg_t, *, num_layers: int, hidden_size: int, num_heads: int, intermediate_size: int):
    """A copy of a teacher's config (same class and family, same vocab, positions, activation, attention
    implementation) with the four sizes replaced, through the family's own attribute names; an embedding size
    tied to the hidden size shrinks with it, and so on: each family's own ``resize`` (fastkd.models.families)."""
    family = family_of(cfg_t, "teacher")
    sizes = (num_layers, hidden_size, num_heads, intermediate_size)
    current = (cfg_t.num_hidden_layers, cfg_t.hidden_size, getattr(cfg_t, family.heads), getattr(cfg_t, family.ffn))
    if not family.resizable and sizes != current:
        raise ValueError(f"student: a {cfg_t.model_type} config cannot be resized by fastkd (its bottleneck sizes "
                         f"are tied to the hidden size); pass a pretrained student with --student DIR")
    cfg = copy.deepcopy(cfg_t)
    if getattr(cfg_t, "embedding_size", None) == cfg_t.hidden_size:  # tied to the hidden size (no projection)
        cfg.embedding_size = hidden_size
    cfg.num_hidden_layers = num_layers
    cfg.hidden_size = hidden_size
    setattr(cfg, family.heads, num_heads)
    setattr(cfg, family.ffn, intermediate_size)
    if family.resize is not None:  # what else follows the sizes in this family (fastkd.models.families)
        family.resize(cfg_t, cfg)
    return cfg


def uniform_layers(num_teacher_layers: int, num_layers: int) -> list[int]:
    """ETD's depth rule: teacher layers [0, n/m, 2n/m, …] (floored), 0-based."""
    return [i * num_teacher_layers // num_layers for i in range(num_layers)]


