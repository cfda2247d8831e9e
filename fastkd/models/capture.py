"""Capture activations from transformers encoders without ``output_attentions``.

Forward hooks record exactly what a recipe asks for, at the places the model's :class:`~fastkd.models.families.
EncoderFamily` names: the embedding output, each layer's output (the final LayerNorm's for the last layer where
the model has one), and each layer's Q/K/V, after the model's rotary step where it has one. The model keeps its
fast (SDPA) attention path where it has one: no L×L map is ever materialised, and only the requested layers are
kept alive.

Layer indices are 0-based; ``hidden[i]`` is ``output_hidden_states[i + 1]`` and ``embeddings`` is
``output_hidden_states[0]`` (tests/test_families.py checks both for every family). Q, K, V are returned per head
as [B, H, L, d] (views of the projection outputs where no rotary step applies).
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from fastkd.models.families import as_heads, base_model, family_of, layer_module, module_at
from fastkd.terms import BUILTIN_SEQ_DIMS, captured_field, parse_field


@dataclass
class Captured:
    embeddings: torch.Tensor | None = None
    hidden: dict[int, torch.Tensor] = field(default_factory=dict)
    q: dict[int, torch.Tensor] = field(default_factory=dict)
    k: dict[int, torch.Tensor] = field(default_factory=dict)
    v: dict[int, torch.Tensor] = field(default_factory=dict)
    scores: dict[int, torch.Tensor] = field(default_factory=dict)  # real [B, H, L, L] scores (DeBERTa, MPNet)
    fields: dict[str, dict[int, torch.Tensor]] = field(default_factory=dict)  # kind-declared fields by layer

    def clear(self) -> None:
        self.embeddings = None
        for d in (self.hidden, self.q, self.k, self.v, self.scores, self.fields):
            d.clear()


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
        scores: Iterable[int] = (),
        layer_fields: dict[str, Iterable[int]] | None = None,
    ):
        """``scores``: layers whose real attention scores to record, for a family whose scores Q and K alone do
        not give (:attr:`fastkd.models.families.EncoderFamily.real_scores`). ``layer_fields``: {name: layers} of the
        fields loss kinds declare (:class:`fastkd.terms.CapturedField`: a module's output inside each layer)."""
        self.family = family_of(model)
        self.family.check_layout(base_model(model).config, "model")
        self.model, self.base = model, base_model(model)
        cfg = self.base.config
        n = cfg.num_hidden_layers
        self.num_heads = getattr(cfg, self.family.heads)
        wanted = list(range(n)) if layers is None else [int(i) for i in layers]
        for i in wanted:
            if not -n <= i < n:
                raise ValueError(f"layers: index {i} out of range for a model with {n} layers")
        wanted = sorted({i % n for i in wanted})
        hidden_layers = wanted if hidden is True else [] if hidden is False else sorted(i % n for i in hidden)
        qkv_of = {i: qkv for i in wanted} if isinstance(qkv, str) else {int(i) % n: s for i, s in qkv.items()}
        for s in qkv_of.values():
            if set(s) - set("qkv"):
                raise ValueError(f"qkv: expected letters from 'qkv', got {s!r}")
        self._fields = dict(qkv_of)  # what the caller asked for (Q/K for real scores are held, not returned)
        self.score_layers = sorted({int(i) % n for i in scores})
        if self.score_layers and self.family.real_scores is None:
            raise ValueError(f"scores: a {cfg.model_type} model's scores are q·kᵀ/√d of its Q and K; capture those")
        for i in self.score_layers:  # the real scores are computed from the layer's Q and K
            qkv_of[i] = "".join(sorted(set(qkv_of.get(i, "")) | {"q", "k"}))
        self.layer_fields = {name: sorted({int(i) % n for i in layers})
                             for name, layers in (layer_fields or {}).items()}
        self.n = n
        self.out = Captured()
        self._kept_qk: dict[tuple[str, int], torch.Tensor] = {}  # Q/K held only for a layer's real scores
        self._plan = (embeddings, hidden_layers, {i: s for i, s in qkv_of.items() if s})
        self._handles: list = []
        self._calls: dict[int, int] = {}  # per hooked module: calls in this forward (a shared layer runs n times)
        self._attn_args: dict[int, inspect.BoundArguments] = {}

    # -------------------------------------------------------- hooks

    def _call_number(self, key: int) -> int:
        """How many times the hooked module has already run in this forward."""
        i = self._calls.get(key, 0)
        self._calls[key] = i + 1
        return i

    def _hook(self, layer: int | None, record):
        """A forward hook calling record(layer index, output tensor). A shared module (layer None) computes
        layer i on its i-th call of a forward. A layer's own module records its first call only: a later call in
        the same forward is not the layer's output on its hidden states (DeBERTa-v3's shared-key attention runs
        query_proj and key_proj again on the relative embeddings, and so does its real-score function, which
        capture itself calls from inside this hook)."""
        key = object()

        def hook(_mod, _inp, output):
            call = self._call_number(id(key))
            if layer is not None and call:
                return
            t = output[0] if isinstance(output, tuple) else output
            record(call if layer is None else layer, t)

        return hook

    def _wants(self, layer: int, letter: str) -> bool:
        return letter in self._plan[2].get(layer, "")

    def _record_qkv(self, letters: str):
        def record(i, t):
            if not any(self._wants(i, c) for c in letters):
                return
            if len(letters) == 3 and self.family.split_qkv is not None:  # a family's own fused layout
                q, k, v = self.family.split_qkv(self._attention(i), t)
            elif len(letters) == 3:  # one fused projection [B, L, 3·H·d] = [q | k | v] -> three [B, H, L, d]
                B, L, _ = t.shape
                parts = t.view(B, L, 3, self.num_heads, -1).unbind(dim=2)
                q, k, v = (p.transpose(1, 2) for p in parts)
            else:
                q = k = v = None
                t = as_heads(t, self.num_heads)
                q, k, v = (t if letters == c else None for c in "qkv")
            if self.family.rotate is not None:
                q, k, v = self.family.rotate(self._attention(i), self._attn_args.get(i), q, k, v)
            for c, x in zip("qkv", (q, k, v), strict=True):
                if x is not None and c in self._fields.get(i, ""):
                    getattr(self.out, c)[i] = x
            if i in self.score_layers:
                self._keep_for_scores(i, q, k)

        return record

    def _keep_for_scores(self, i: int, q, k) -> None:
        """Once a layer's Q and K are both in, its real scores by the model's own function."""
        for c, x in (("q", q), ("k", k)):
            if x is not None:
                self._kept_qk[(c, i)] = x
        if ("q", i) in self._kept_qk and ("k", i) in self._kept_qk:
            qi, ki = self._kept_qk.pop(("q", i)), self._kept_qk.pop(("k", i))
            self.out.scores[i] = self.family.real_scores(self._attention(i), self._attn_args.get(i), qi, ki)

    def _attention(self, i: int) -> nn.Module:
        return module_at(layer_module(self.model, self.family, i), self.family.attention)

    def _sites(self, layers: list[int]) -> list[tuple[nn.Module, int | None]]:
        """(module, its layer or None when shared) for the given layers, each module once."""
        if self.family.shared_layer:
            return [(layer_module(self.model, self.family, 0), None)] if layers else []
        return [(layer_module(self.model, self.family, i), i) for i in layers]

    def __enter__(self) -> ActivationCapture:
        embeddings, hidden_layers, qkv_of = self._plan
        self._handles.append(self.base.register_forward_pre_hook(lambda *_: self._calls.clear()))
        if embeddings:
            emb = module_at(self.base, self.family.embeddings)
            self._handles.append(emb.register_forward_hook(self._hook(-1, lambda _i, t: setattr(
                self.out, "embeddings", t))))
        final = module_at(self.base, self.family.final_norm) if self.family.final_norm else None
        if final is not None and self.n - 1 in hidden_layers:
            self._handles.append(final.register_forward_hook(self._hook(self.n - 1, self.out.hidden.__setitem__)))
        wanted_hidden = set(hidden_layers) - ({self.n - 1} if final is not None else set())

        def record_hidden(i, t):
            if i in wanted_hidden:
                self.out.hidden[i] = t

        for mod, i in self._sites(sorted(wanted_hidden) if not self.family.shared_layer else hidden_layers):
            self._handles.append(mod.register_forward_hook(self._hook(i, record_hidden)))
        self._hook_qkv(sorted(qkv_of))
        for name, layers in self.layer_fields.items():
            path = captured_field(name).path_for(self.family.name)
            store = self.out.fields.setdefault(name, {})
            for mod, i in self._sites(layers):
                self._handles.append(module_at(mod, path).register_forward_hook(self._hook(i, store.__setitem__)))
        return self

    def _hook_qkv(self, layers: list[int]) -> None:
        fam = self.family
        for layer_mod, i in self._sites(layers):
            if fam.rotate is not None or fam.real_scores is not None:  # (none of these shares its layer)
                attn = module_at(layer_mod, fam.attention)
                signature = inspect.signature(attn.forward)  # read once per hook, not on every forward

                def keep_args(_mod, args, kwargs, i=i, signature=signature):
                    self._attn_args[i] = signature.bind(*args, **kwargs)

                self._handles.append(attn.register_forward_pre_hook(keep_args, with_kwargs=True))
            if fam.fused_qkv:
                proj = module_at(layer_mod, fam.fused_qkv)
                self._handles.append(proj.register_forward_hook(self._hook(i, self._record_qkv("qkv"))))
                continue
            for letter in "qkv":
                if any(letter in s for s in self._plan[2].values()):
                    proj = module_at(layer_mod, getattr(fam, letter))
                    self._handles.append(proj.register_forward_hook(self._hook(i, self._record_qkv(letter))))

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
    scores: Iterable[int] = (),
) -> tuple[object, Captured]:
    """Run ``model(**inputs)`` once and return (model output, captured activations)."""
    with ActivationCapture(model, layers, hidden=hidden, qkv=qkv, embeddings=embeddings, scores=scores) as cap:
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
    scores = [i for c, i in parsed if c == "scores"]
    declared: dict[str, list[int]] = {}
    for c, i in parsed:
        if c not in BUILTIN_SEQ_DIMS:
            declared.setdefault(c, []).append(i)
    layers = sorted(set(hidden) | set(qkv) | set(scores) | {i for ls in declared.values() for i in ls})
    if not (layers or "emb" in fields):  # logits only (method kd): no hooks, so any model with a head works
        yield lambda output: {"logits": output.logits} if "logits" in fields else {}
        return
    with ActivationCapture(model, layers, hidden=hidden, qkv=qkv, embeddings="emb" in fields,
                           scores=scores, layer_fields=declared) as cap:
        def read(output) -> dict[str, torch.Tensor]:
            out = {}
            if "emb" in fields:
                out["emb"] = cap.out.embeddings
            for i in hidden:
                out[f"hidden.{i}"] = cap.out.hidden[i]
            for i, letters in qkv.items():
                for c in letters:
                    out[f"{c}.{i}"] = getattr(cap.out, c)[i]
            for i in scores:
                out[f"scores.{i}"] = cap.out.scores[i]
            for c, ls in declared.items():
                for i in ls:
                    out[f"{c}.{i}"] = cap.out.fields[c][i]
            if "logits" in fields:
                out["logits"] = output.logits
            return out

        yield read
