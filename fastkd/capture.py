"""Capture activations from Hugging Face BERT-family encoders without ``output_attentions``.

Forward hooks on the embedding module, each encoder layer and each layer's query/key/value projections
record exactly what a recipe asks for. The model keeps its fast (SDPA) attention path: no L×L map is ever
materialised, and only the requested layers are kept alive.

Layer indices are 0-based encoder layers (``encoder.layer[i]``); ``hidden[i]`` is that layer's output, which
is ``output_hidden_states[i + 1]``. The embedding output is ``embeddings`` (``output_hidden_states[0]``).
Q, K, V are returned per head as [B, H, L, d] (views of the projection outputs, no copy).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from fastkd.terms import parse_field


@dataclass
class Captured:
    embeddings: torch.Tensor | None = None
    hidden: dict[int, torch.Tensor] = field(default_factory=dict)
    q: dict[int, torch.Tensor] = field(default_factory=dict)
    k: dict[int, torch.Tensor] = field(default_factory=dict)
    v: dict[int, torch.Tensor] = field(default_factory=dict)

    def clear(self) -> None:
        self.embeddings = None
        self.hidden.clear()
        self.q.clear()
        self.k.clear()
        self.v.clear()


def encoder_parts(model: nn.Module) -> tuple[nn.Module, nn.ModuleList, object]:
    """(embedding module whose output enters the encoder, the encoder's layer list, the config) of a
    BERT-family model (BERT, RoBERTa, ELECTRA, MiniLM, with or without a task head)."""
    base = getattr(model, "base_model", model)
    encoder = getattr(base, "encoder", None)
    layers = getattr(encoder, "layer", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(
            f"model: expected a BERT-family encoder with .encoder.layer (BERT, RoBERTa, ELECTRA, MiniLM), "
            f"got {type(model).__name__}"
        )
    # ELECTRA projects embeddings to the hidden size before the encoder when the two differ.
    emb = getattr(base, "embeddings_project", None) or base.embeddings
    return emb, layers, base.config


def _self_attention(layer: nn.Module) -> nn.Module:
    attn = layer.attention
    return getattr(attn, "self", attn)


class ActivationCapture:
    """Context manager that hooks a model and fills a :class:`Captured` on each forward.

    >>> with ActivationCapture(model, layers=[1, 3], qkv="qk", hidden=True) as cap:
    ...     model(input_ids, attention_mask=mask)
    >>> cap.out.q[3].shape  # [B, H, L, d]
    """

    def __init__(
        self,
        model: nn.Module,
        layers: Iterable[int] | None = None,
        *,
        hidden: bool | Iterable[int] = True,
        qkv: str | dict[int, str] = "",
        embeddings: bool = False,
    ):
        emb, self.layer_modules, cfg = encoder_parts(model)
        n = len(self.layer_modules)
        self.num_heads = cfg.num_attention_heads
        wanted = list(range(n)) if layers is None else [int(i) for i in layers]
        for i in wanted:
            if not -n <= i < n:
                raise ValueError(f"layers: index {i} out of range for a model with {n} layers")
        wanted = sorted({i % n for i in wanted})
        hidden_layers = wanted if hidden is True else [] if hidden is False else sorted(i % n for i in hidden)
        if isinstance(qkv, str):
            qkv_of = {i: qkv for i in wanted}
        else:
            qkv_of = {int(i) % n: s for i, s in qkv.items()}
        for s in qkv_of.values():
            if set(s) - set("qkv"):
                raise ValueError(f"qkv: expected letters from 'qkv', got {s!r}")
        self.out = Captured()
        self._plan = (emb if embeddings else None, hidden_layers, qkv_of)
        self._handles: list = []

    def _store(self, slot: dict, i: int, heads: bool):
        def hook(_mod, _inp, output):
            t = output[0] if isinstance(output, tuple) else output
            if heads:
                B, L, D = t.shape
                t = t.view(B, L, self.num_heads, D // self.num_heads).transpose(1, 2)
            slot[i] = t

        return hook

    def __enter__(self) -> ActivationCapture:
        emb, hidden_layers, qkv_of = self._plan
        if emb is not None:

            def emb_hook(_m, _i, output):
                self.out.embeddings = output[0] if isinstance(output, tuple) else output

            self._handles.append(emb.register_forward_hook(emb_hook))
        for i in hidden_layers:
            self._handles.append(self.layer_modules[i].register_forward_hook(self._store(self.out.hidden, i, False)))
        for i, letters in qkv_of.items():
            sa = _self_attention(self.layer_modules[i])
            for letter in letters:
                proj = {"q": sa.query, "k": sa.key, "v": sa.value}[letter]
                slot = getattr(self.out, letter)
                self._handles.append(proj.register_forward_hook(self._store(slot, i, True)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


def capture(
    model: nn.Module,
    inputs: dict[str, torch.Tensor],
    layers: Iterable[int] | None = None,
    *,
    hidden: bool | Iterable[int] = True,
    qkv: str | dict[int, str] = "",
    embeddings: bool = False,
) -> tuple[object, Captured]:
    """Run ``model(**inputs)`` once and return (model output, captured activations)."""
    with ActivationCapture(model, layers, hidden=hidden, qkv=qkv, embeddings=embeddings) as cap:
        output = model(**inputs)
    return output, cap.out


@contextlib.contextmanager
def capture_fields(model: nn.Module, fields: list[str]):
    """Hooks recording ``fields`` (cache naming) on ``model``; yields a function returning them."""
    parsed = [parse_field(f) for f in fields]
    hidden = [i for c, i in parsed if c == "hidden"]
    qkv: dict[int, str] = {}
    for c, i in parsed:
        if c in ("q", "k", "v"):
            qkv[i] = qkv.get(i, "") + c
    layers = sorted(set(hidden) | set(qkv))
    with ActivationCapture(model, layers, hidden=hidden, qkv=qkv, embeddings="emb" in fields) as cap:
        def read(output) -> dict[str, torch.Tensor]:
            out = {}
            if "emb" in fields:
                out["emb"] = cap.out.embeddings
            for i in hidden:
                out[f"hidden.{i}"] = cap.out.hidden[i]
            for i, letters in qkv.items():
                for c in letters:
                    out[f"{c}.{i}"] = getattr(cap.out, c)[i]
            if "logits" in fields:
                out["logits"] = output.logits
            return out

        yield read
