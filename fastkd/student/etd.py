"""ETD (Extract Then Distill): initialise a smaller student by extracting a teacher's own weights.

``extract_student(teacher, num_layers=..., hidden_size=..., num_heads=..., intermediate_size=...)`` returns a
model of the teacher's own ``transformers`` class (BERT, RoBERTa, ELECTRA, the packaged MiniLM; with or without
a task head) whose weights are slices of the teacher's, on every axis:

* depth: teacher layers ``[⌊i·n/m⌋ for i in range(m)]`` (the paper's uniform rule ``[0, n/m, 2n/m, …]``), for
  both strategies;
* attention heads: whole heads (Q/K/V output rows, attention-output dense input columns), per layer;
* FFN neurons: intermediate dense rows and output dense input columns, per layer;
* hidden dimensions: one set for the whole residual stream, applied to the embeddings (word, position,
  token type, LayerNorm), every projection, every LayerNorm, the pooler and the task head.

Head dimension. BERT-family configs tie the head dimension to ``hidden_size / num_attention_heads``, so it can
change even when only the head count does. The rule used here (``d_t`` teacher, ``d_s`` student head dim):

* ``d_s < d_t``: keep ``d_s`` of each kept head's dims: for Q and K the same dims (a score is a sum of
  q_i·k_i products, so the pair goes together), for V its own set; by importance (``impt``) or at random
  (``rand``). The student's own 1/√d_s scale keeps the scores' spread, as in any BERT.
* ``d_s > d_t``: keep every teacher dim and pad each head with ``d_s − d_t`` new dims chosen so the function is
  unchanged yet trainable: Q rows zero, K rows random, so the extra q·k terms are exactly 0 while Q still gets a
  gradient; Q is scaled by √(d_s/d_t) to cancel the student's smaller 1/√d_s; V rows random with zero
  attention-output columns. Removing heads at a fixed hidden size therefore gives exactly the teacher's output
  under the equivalent head mask (:func:`head_gates`), up to float rounding.

Removing hidden dimensions changes every LayerNorm's statistics, so the student's outputs differ from the
teacher's even on kept dimensions; that is inherent to ETD, and what the distillation afterwards repairs.

Importance (``strategy="impt"``), accumulated over at most ``num_batches`` batches of ``data``, no retraining,
following DynaBERT's public code:

* head: Σ_batches |∂L/∂g_h| with a gate g_h = 1 multiplying the head's context (transformers 5 has no
  ``head_mask``, so :func:`head_gates` installs the gate as a pre-hook on the attention-output dense layer);
* FFN neuron: Σ_batches (|Σ w·∂L/∂w + b·∂L/∂b| over its intermediate row and bias + |Σ w·∂L/∂w| over its
  output column);
* hidden dimension: the same first-order (Taylor) score summed over every tensor slice that carries the
  dimension (embedding columns, projection input columns, projection output rows with their bias, LayerNorm
  weight with bias), one |·| per tensor slice as DynaBERT does per tensor;
* per-head dims (only when the head dim shrinks): the same score over Q and K rows (together) and V rows with
  their attention-output column.

Objectives: ``"task"`` is the task loss (cross-entropy, or MSE for a single-output regression head); it needs
a model with a task head and ``labels`` in the batches. ``"sensitivity"`` needs no labels: L = ⟨f(x), r⟩/√N
with f the model's output (logits, else the last hidden state over valid tokens) and r ~ N(0, I) drawn afresh
per batch. Why this proxy: self-distillation against the model's own output has zero gradient at the teacher
itself, while E|∂⟨f, r⟩/∂θ·w| ∝ ‖∂f/∂θ·w‖, the first-order change of the whole output when the unit is
removed, which is what the later hidden-state / attention distillation has to repair. ``"auto"`` (default)
picks ``"task"`` when the output has logits and the first batch has labels, else ``"sensitivity"``.

CLI: ``python -m fastkd.student.etd --teacher default --layers 3 --hidden 384 --heads 12 --ffn 1536 --strategy impt
--task sst2 [--teacher-layers 1,3,5] --out DIR`` writes the student (``save_pretrained``), the teacher's
tokenizer and ``etd_plan.json``.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from fastkd.models.encoder import (
    check_encoder,
    encoder_layers,
    layer_params,
    student_config,
    uniform_layers,
)
from fastkd.models.families import etd_model_types, family_of, ffn_size
from fastkd.student.importance import OBJECTIVES, Importance, compute_importance, ffn_gates, head_gates, hidden_axes

__all__ = [
    "etd_model_types",
    "ExtractionPlan",
    "Importance",
    "extract_student",
    "student_config",
    "uniform_layers",
    "head_gates",
    "ffn_gates",
    "compute_importance",
    "plan_extraction",
    "apply_plan",
    "text_batches",
    "main",
]

STRATEGIES = ("impt", "rand")


# ---------------------------------------------------------------- the plan


@dataclass
class ExtractionPlan:
    """Which teacher units the student keeps, all as sorted teacher indices.

    layers [m]; hidden [D_s]; per student layer: heads [H_s], qk_dims / v_dims [H_s, min(d_s, d_t)] (dims
    within each kept head), ffn [F_s]."""

    layers: list[int]
    hidden: torch.Tensor
    heads: list[torch.Tensor] = field(default_factory=list)
    qk_dims: list[torch.Tensor] = field(default_factory=list)
    v_dims: list[torch.Tensor] = field(default_factory=list)
    ffn: list[torch.Tensor] = field(default_factory=list)
    strategy: str = ""
    seed: int = 0

    def to_json(self) -> dict:
        return {"strategy": self.strategy, "seed": self.seed, "layers": self.layers,
                "hidden": self.hidden.tolist(), "heads": [h.tolist() for h in self.heads],
                "qk_dims": [x.tolist() for x in self.qk_dims], "v_dims": [x.tolist() for x in self.v_dims],
                "ffn": [f.tolist() for f in self.ffn]}


def _check_layers(layers, m: int, cfg_t) -> list[int]:
    n = cfg_t.num_hidden_layers
    if (not isinstance(layers, (list, tuple)) or len(layers) != m
            or any(isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n for i in layers)
            or list(layers) != sorted(set(layers))):
        raise ValueError(f"layers: expected {m} increasing distinct teacher layer indices in [0, {n}), got {layers!r}")
    return list(layers)


def _top(score: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k highest scores, sorted ascending; ties go to the lower index (stable)."""
    order = torch.argsort(-score.double(), stable=True)
    return order[:k].sort().values


def _rand(n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randperm(n, generator=gen)[:k].sort().values


def plan_extraction(teacher: nn.Module, cfg_s, *, strategy: str, importance: Importance | None = None,
                    seed: int = 0, layers: list[int] | None = None) -> ExtractionPlan:
    """Choose the kept units: top-k by ``importance`` (``impt``) or seeded random (``rand``) on each axis."""
    cfg_t = check_encoder(teacher)
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy: expected one of {STRATEGIES}, got {strategy!r}")
    if strategy == "impt" and importance is None:
        raise ValueError("importance: strategy 'impt' needs an Importance (see compute_importance)")
    H_t, D_t, F_t = cfg_t.num_attention_heads, cfg_t.hidden_size, ffn_size(cfg_t)
    d_t = D_t // H_t
    m, D_s, H_s, F_s = cfg_s.num_hidden_layers, cfg_s.hidden_size, cfg_s.num_attention_heads, ffn_size(cfg_s)
    d_keep = min(D_s // H_s, d_t)
    if family_of(cfg_t, "teacher").shared_layer:  # one shared layer (ALBERT): cut once, run m times
        layers = [0]
    elif layers is None:
        layers = uniform_layers(cfg_t.num_hidden_layers, m)
    else:
        layers = _check_layers(layers, m, cfg_t)
    gen = torch.Generator().manual_seed(seed)
    # A per-head table shared by all layers (MPNet's position bias) can follow only one head set: every layer
    # then keeps the same heads, by importance summed over the kept layers (or one random draw).
    same_heads = bool(family_of(cfg_t, "teacher").shared_heads)
    if strategy == "rand":
        hidden = _rand(D_t, D_s, gen)
        plan = ExtractionPlan(layers, hidden, strategy=strategy, seed=seed)
        common = _rand(H_t, H_s, gen) if same_heads else None
        for _ in layers:
            heads = common if same_heads else _rand(H_t, H_s, gen)
            plan.heads.append(heads)
            plan.qk_dims.append(torch.stack([_rand(d_t, d_keep, gen) for _ in heads]))
            plan.v_dims.append(torch.stack([_rand(d_t, d_keep, gen) for _ in heads]))
            plan.ffn.append(_rand(F_t, F_s, gen))
        return plan
    plan = ExtractionPlan(layers, _top(importance.hidden, D_s), strategy=strategy, seed=seed)
    common = _top(importance.head[layers].sum(0), H_s) if same_heads else None
    for li in layers:
        heads = common if same_heads else _top(importance.head[li], H_s)
        plan.heads.append(heads)
        plan.qk_dims.append(torch.stack([_top(importance.qk_dim[li, h], d_keep) for h in heads.tolist()]))
        plan.v_dims.append(torch.stack([_top(importance.v_dim[li, h], d_keep) for h in heads.tolist()]))
        plan.ffn.append(_top(importance.ffn[li], F_s))
    return plan


# ---------------------------------------------------------------- building the student


def _take(t: torch.Tensor, dim: int, idx: torch.Tensor) -> torch.Tensor:
    """index_select along ``dim`` where idx −1 means a new (zero) slice."""
    out = t.index_select(dim, idx.clamp_min(0).to(t.device))
    pad = idx < 0
    if bool(pad.any()):
        shape = [1] * out.dim()
        shape[dim] = -1
        out = out.masked_fill(pad.view(shape).to(t.device), 0)
    return out


def _head_rows(heads: torch.Tensor, dims: torch.Tensor, d_t: int, d_s: int) -> torch.Tensor:
    """Teacher rows (in the concatenated-heads layout) of each student head's dims; −1 = a padded new dim."""
    rows = heads[:, None] * d_t + dims  # [H_s, min(d_s, d_t)]
    if d_s > d_t:
        rows = torch.cat([rows, rows.new_full((rows.shape[0], d_s - d_t), -1)], dim=1)
    return rows.flatten()


def apply_plan(teacher: nn.Module, cfg_s, plan: ExtractionPlan, *, seed: int = 0) -> nn.Module:
    """Build ``type(teacher)(cfg_s)`` and fill every weight from the teacher by ``plan``."""
    cfg_t = check_encoder(teacher)
    if getattr(cfg_t, "layer_types", None):  # each kept layer keeps its attention type (ModernBERT: global/local)
        cfg_s.layer_types = [cfg_t.layer_types[j] for j in plan.layers]
    ref = next(teacher.parameters())
    D_t, H_t = cfg_t.hidden_size, cfg_t.num_attention_heads
    d_t, d_s = D_t // H_t, cfg_s.hidden_size // cfg_s.num_attention_heads
    hid = plan.hidden
    sd_t = teacher.state_dict()
    student = type(teacher)(cfg_s).to(device=ref.device, dtype=ref.dtype)
    gen = torch.Generator().manual_seed(seed + 7919)  # the padded dims' random init
    std = float(getattr(cfg_t, "initializer_range", 0.02))
    layer_prefix = _layer_prefix(teacher)
    params = layer_params(teacher)
    shared_heads = family_of(cfg_t, "teacher").shared_heads
    outer = {}  # teacher param id -> list of (axis) carrying the hidden dim
    for p, axis, b in hidden_axes(teacher, D_t):
        outer.setdefault(id(p), set()).add(axis)
        if b is not None:
            outer.setdefault(id(b), set()).add(0)
    param_of = dict(teacher.named_parameters(remove_duplicate=False))
    new = {}
    for key, target in student.state_dict().items():
        if key.startswith(layer_prefix):
            i_s, rest = key[len(layer_prefix):].split(".", 1)
            li = int(i_s)
            t_key = f"{layer_prefix}{plan.layers[li]}.{rest}"
            value = _layer_param(rest, sd_t[t_key], plan, li, hid, d_t, d_s, gen, std, params)
        else:
            t = sd_t[key]
            p = param_of.get(key)
            value = t
            for axis in sorted(outer.get(id(p), ())) if p is not None else ():
                value = value.index_select(axis, hid.to(t.device))
            for suffix, axis in (shared_heads or {}).items():  # the one head set every layer kept
                if key.endswith(suffix):
                    value = value.index_select(axis, plan.heads[0].to(t.device))
        if tuple(value.shape) != tuple(target.shape):
            raise ValueError(f"teacher: unsupported parameter {key}: extracted shape {tuple(value.shape)}, the "
                             f"student needs {tuple(target.shape)}")
        new[key] = value.to(device=target.device, dtype=target.dtype)
    student.load_state_dict(new, strict=True)
    student.train(teacher.training)
    return student


def _layer_prefix(model: nn.Module) -> str:
    layers = encoder_layers(model)
    for name, mod in model.named_modules():
        if mod is layers:
            return name + "."
    raise ValueError("teacher: could not locate encoder.layer")


_FUSED = ("qkv", "qkv_interleaved", "qv_bias", "ffn_in_glu")


def _fused_param(part: str, kind: str, t: torch.Tensor, plan: ExtractionPlan, li: int, hid: torch.Tensor,
                 d_t: int, d_s: int, gen: torch.Generator, std: float) -> torch.Tensor:
    """A fused layer parameter cut through its parts (see fastkd.models.families.BERT_LAYER_PARAMS)."""
    if part == "qkv":  # one Linear giving [q | k | v] (ModernBERT's Wqkv): each third cut by its own rule
        thirds = t.chunk(3, dim=0)
        return torch.cat([_layer_param(f"{name}.{kind}", x, plan, li, hid, d_t, d_s, gen, std,
                                       {name: name}) for name, x in zip(("query", "key", "value"), thirds,
                                                                        strict=True)])
    if part == "qkv_interleaved":  # [q_h | k_h | v_h] per head (DeBERTa v1): cut each, re-interleave
        H_t = t.shape[0] // (3 * d_t)
        blocks = t.view(H_t, 3, d_t, *t.shape[1:]).transpose(0, 1).reshape(t.shape).chunk(3)
        cut = [_layer_param(f"{name}.{kind}", x, plan, li, hid, d_t, d_s, gen, std, {name: name})
               for name, x in zip(("query", "key", "value"), blocks, strict=True)]
        H_s = len(plan.heads[li])
        return torch.stack([c.view(H_s, d_s, *c.shape[1:]) for c in cut], dim=1).reshape(3 * H_s * d_s,
                                                                                         *cut[0].shape[1:])
    if part == "qv_bias":  # a module's own q_bias / v_bias (DeBERTa v1): cut as the query / value bias
        name = {"q_bias": "query", "v_bias": "value"}[kind]
        return _layer_param(f"{name}.bias", t, plan, li, hid, d_t, d_s, gen, std, {name: name})
    if part == "ffn_in_glu":  # [input half | gate half] (GeGLU): a kept unit keeps its row in both halves
        return torch.cat([_layer_param(f"ffn_in.{kind}", x, plan, li, hid, d_t, d_s, gen, std, {"ffn_in": "ffn_in"})
                          for x in t.chunk(2, dim=0)])
    raise ValueError(f"teacher: unknown fused part {part!r}")


def _layer_param(rest: str, t: torch.Tensor, plan: ExtractionPlan, li: int, hid: torch.Tensor, d_t: int,
                 d_s: int, gen: torch.Generator, std: float, params: dict[str, str]) -> torch.Tensor:
    module, _, kind = rest.rpartition(".")
    part = params.get(module)
    if part is None:
        raise ValueError(f"teacher: unsupported parameter {rest!r} in an encoder layer")
    if part in _FUSED:
        return _fused_param(part, kind, t, plan, li, hid, d_t, d_s, gen, std)
    heads = plan.heads[li]
    if part in ("query", "key"):
        rows = _head_rows(heads, plan.qk_dims[li], d_t, d_s)
    elif part == "value":
        rows = _head_rows(heads, plan.v_dims[li], d_t, d_s)
    if part in ("query", "key", "value"):
        out = _take(t, 0, rows)
        if kind == "weight":
            out = out.index_select(1, hid.to(t.device))
        pad = (rows < 0).to(t.device)
        if bool(pad.any()):
            if part == "query":  # exact zero extra q·k terms; undo the smaller 1/√d_s of the student
                out = out * math.sqrt(d_s / d_t)
            elif kind == "weight":  # K, V: random rows so the zero Q rows and zero output columns can learn
                noise = torch.randn(out.shape, generator=gen, dtype=torch.float32) * std
                out = torch.where(pad[:, None], noise.to(out), out)
        return out
    if part == "attn_out":
        if kind == "bias":
            return t.index_select(0, hid.to(t.device))
        cols = _head_rows(heads, plan.v_dims[li], d_t, d_s)
        return _take(t.index_select(0, hid.to(t.device)), 1, cols)
    ffn = plan.ffn[li].to(t.device)
    if part == "ffn_in":
        return t.index_select(0, ffn).index_select(1, hid.to(t.device)) if kind == "weight" else t.index_select(0, ffn)
    if part == "ffn_out":
        t = t.index_select(0, hid.to(t.device))
        return t.index_select(1, ffn) if kind == "weight" else t
    return t.index_select(0, hid.to(t.device))  # LayerNorms


def extract_student(teacher: nn.Module, *, num_layers: int, hidden_size: int, num_heads: int,
                    intermediate_size: int, strategy: str = "impt", data: Iterable[Mapping] | None = None,
                    seed: int = 0, num_batches: int = 64, objective: str = "auto",
                    importance: Importance | None = None, layers: list[int] | None = None,
                    return_plan: bool = False):
    """A student of the teacher's own class and config family, every weight extracted from the teacher.

    ``strategy="impt"`` keeps the most important units (needs ``data`` or a precomputed ``importance``);
    ``"rand"`` a seeded random subset. See the module docstring for the rules. Returns the student, or
    ``(student, plan)`` with ``return_plan=True``. The teacher is not modified. ``layers`` overrides the
    uniform depth rule with explicit 0-based teacher layers (e.g. [1, 3, 5] to match TinyBERT's layer mapping).
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy: expected one of {STRATEGIES}, got {strategy!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed: expected an int, got {seed!r}")
    cfg_s = student_config(teacher, num_layers=num_layers, hidden_size=hidden_size, num_heads=num_heads,
                           intermediate_size=intermediate_size)
    if strategy == "impt" and importance is None:
        if data is None:
            raise ValueError("data: strategy 'impt' needs an iterable of batches (dicts of input_ids, "
                             "attention_mask, optional labels), or pass importance=")
        importance = compute_importance(teacher, data, num_batches=num_batches, objective=objective, seed=seed)
    plan = plan_extraction(teacher, cfg_s, strategy=strategy, importance=importance, seed=seed, layers=layers)
    student = apply_plan(teacher, cfg_s, plan, seed=seed)
    return (student, plan) if return_plan else student


# ---------------------------------------------------------------- data helper and CLI


def text_batches(tokenizer, texts: list[str], *, batch_size: int = 32, max_length: int = 64,
                 labels: list[int] | None = None, text_pairs: list[str] | None = None) -> Iterator[dict]:
    """Tokenised batches (padded to the longest in each batch) of ``texts`` in order; with ``text_pairs``, of
    sentence pairs (with the tokenizer's segment ids)."""
    for start in range(0, len(texts), batch_size):
        chunk = texts[start:start + batch_size]
        pairs = text_pairs[start:start + batch_size] if text_pairs is not None else None
        enc = tokenizer(chunk, pairs, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        batch = dict(enc)
        if labels is not None:
            batch["labels"] = torch.as_tensor(labels[start:start + batch_size])
        yield batch


def _load_teacher(path):
    from transformers import AutoTokenizer

    from fastkd.models.teacher import load_model, resolve_model_path

    path = resolve_model_path(None if str(path) == "default" else path)
    return load_model(path), AutoTokenizer.from_pretrained(path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fastkd.etd", description="Extract a student from a teacher (ETD).",
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--teacher", default="default", help="model folder, or 'default' for the packaged MiniLM")
    ap.add_argument("--layers", type=int, required=True, help="student depth")
    ap.add_argument("--hidden", type=int, required=True, help="student width (a multiple of --heads)")
    ap.add_argument("--heads", type=int, required=True, help="student attention heads (whole teacher heads kept)")
    ap.add_argument("--ffn", type=int, required=True, help="student FFN width (teacher neurons kept)")
    ap.add_argument("--teacher-layers", default=None, metavar="I,J,…",
                    help="0-based teacher layers to keep, one per student layer (e.g. 1,3,5: the layers a "
                         "TinyBERT-style mapping distils from); default: the uniform depth rule")
    ap.add_argument("--strategy", choices=STRATEGIES, default="impt",
                    help="impt: keep the most important units (needs data); rand: a seeded random subset")
    ap.add_argument("--task", default="sst2", help="data for 'impt' importance (fastkd.data task name)")
    ap.add_argument("--split", default="train", help="split of --task the importance is measured on")
    ap.add_argument("--objective", choices=OBJECTIVES, default="auto",
                    help="importance loss: task (the head's loss on the labels), sensitivity (a random "
                         "projection of the output, no labels), auto (task when the teacher has a head and the "
                         "data labels)")
    ap.add_argument("--num-batches", type=int, default=64, help="batches the importance is summed over")
    ap.add_argument("--batch-size", type=int, default=32, help="examples per importance batch")
    ap.add_argument("--max-length", type=int, default=64, help="tokens per example at most")
    ap.add_argument("--seed", type=int, default=0, help="seed of the data sample and of 'rand'")
    ap.add_argument("--out", required=True, help="folder for the student (save_pretrained + tokenizer + plan)")
    args = ap.parse_args(argv)
    layers = None
    if args.teacher_layers is not None:
        try:
            layers = [int(x) for x in args.teacher_layers.split(",")]
        except ValueError:
            ap.error(f"--teacher-layers: expected comma-separated 0-based layer numbers, got {args.teacher_layers!r}")

    teacher, tokenizer = _load_teacher(args.teacher)
    data = None
    if args.strategy == "impt":
        from fastkd.data import load_task

        ds = load_task(args.task, args.split).shuffle(seed=args.seed)
        n = min(len(ds), args.num_batches * args.batch_size)
        ds = ds.select(range(n))
        data = text_batches(tokenizer, list(ds["text"]), batch_size=args.batch_size, max_length=args.max_length,
                            labels=list(ds["label"]),
                            text_pairs=list(ds["text_pair"]) if "text_pair" in ds.column_names else None)
    student, plan = extract_student(teacher, num_layers=args.layers, hidden_size=args.hidden, num_heads=args.heads,
                                    intermediate_size=args.ffn, strategy=args.strategy, data=data, seed=args.seed,
                                    num_batches=args.num_batches, objective=args.objective, layers=layers,
                                    return_plan=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    student.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "etd_plan.json").write_text(json.dumps({"teacher": str(args.teacher), **vars(args),
                                                   "plan": plan.to_json()}, indent=1))
    n_params = sum(p.numel() for p in student.parameters())
    print(f"etd: wrote {type(student).__name__} ({n_params / 1e6:.2f}M parameters, layers {plan.layers}) to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
