"""Loss terms: the one registry of loss kinds, and the names of the activations they read.

A recipe's :class:`LossTerm` names a kind. Each kind is one :func:`register_kind` call giving what it reads from
each model (``capture``), how it is computed from the captured activations (``compute``), and optionally what
runs after every optimizer step (``after_step``: BERT-EMD's layer-weight update) and what it adds to the logged
record. Recipes, the capture plan, the loss module and the trainer all read this registry, so adding a kind is
one registration here.

Activation fields are named ``emb``, ``hidden.{i}`` [B, L, D], ``q.{i}`` / ``k.{i}`` / ``v.{i}`` [B, H, L, d],
``scores.{i}`` [B, H, L, L] (a model's real attention scores, for families whose scores Q and K alone do not
give: see :mod:`fastkd.models.families`) and ``logits`` [B, C] (the activation cache stores them under the same names,
except ``scores``, which it does not cache); :func:`field_name` builds a name, :func:`seq_dim` tells its token
dimension. A kind that reads another activation declares it in its own registration (``fields``: a
:class:`CapturedField`, the output of a module inside each layer), and capture, the cache and the plan pick it up
from there. A kind that keeps state across steps declares a factory for it (``state``); the loss module holds
one instance per state name (BERT-EMD's two kinds share their layer weights).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from fastkd import losses
from fastkd.losses.emd import EMDState, update_layer_weights

# ---------------------------------------------------------------- activation fields

BUILTIN_SEQ_DIMS = {"emb": 1, "hidden": 1, "q": 2, "k": 2, "v": 2, "scores": 2, "logits": None}


@dataclass(frozen=True)
class CapturedField:
    """An activation beyond the built-in ones: the output of the module at ``path`` inside each encoder layer
    (``paths`` per family name where it differs), recorded as ``<name>.<layer>`` with its tokens at ``seq_dim``."""

    name: str
    path: str
    seq_dim: int = 1
    paths: dict[str, str] = field(default_factory=dict)

    def path_for(self, family: str) -> str:
        return self.paths.get(family, self.path)


def field_name(kind: str, layer: int | None = None) -> str:
    """``emb``, ``logits`` or ``<kind>.<layer>`` (hidden, q, k, v)."""
    return kind if layer is None else f"{kind}.{layer}"


def parse_field(name: str) -> tuple[str, int | None]:
    """(kind, layer) of a field name: ("hidden", 3) for ``hidden.3``, ("emb", None) for ``emb``."""
    kind, _, layer = name.partition(".")
    return kind, int(layer) if layer else None


def reads_score_maps(fields: list[str]) -> bool:
    """Whether any field is a real [B, H, L, L] score map (which the activation cache does not hold)."""
    return any(parse_field(f)[0] == "scores" for f in fields)


def seq_dim(name: str) -> int | None:
    """The token dimension of a field (None for per-example fields such as logits)."""
    kind = name.split(".")[0]
    return BUILTIN_SEQ_DIMS[kind] if kind in BUILTIN_SEQ_DIMS else captured_field(kind).seq_dim


def empty_plan() -> dict[str, Any]:
    """What one side records: embeddings (bool), hidden layers, {layer: "qkv" letters}, all layers' hidden states
    or Q/K (for EMD), logits (bool), and {captured field name: layers} for the fields kinds declare."""
    return {"embeddings": False, "hidden": set(), "qkv": {}, "scores": set(), "all_hidden": False, "all_qk": False,
            "logits": False, "layers": {}}


def plan_fields(plan: dict, n_layers: int, real_scores: bool = False) -> list[str]:
    """A capture plan as field names, in a fixed order (emb, hidden by layer, q/k/v by layer, scores, logits).
    The layers whose attention scores a term reads become Q and K, or with ``real_scores`` (a family whose
    scores Q and K do not give) the model's own ``scores``."""
    names = [field_name("emb")] if plan["embeddings"] else []
    hidden = set(range(n_layers)) if plan["all_hidden"] else set(plan["hidden"])
    names += [field_name("hidden", i) for i in sorted(hidden)]
    qkv = {i: set(s) for i, s in plan["qkv"].items()}
    if not real_scores:
        for i in plan["scores"]:
            qkv.setdefault(i, set()).update("qk")
    if plan["all_qk"]:
        for i in range(n_layers):
            qkv.setdefault(i, set()).update("qk")
    names += [field_name(c, i) for i in sorted(qkv) for c in sorted(qkv[i])]
    if real_scores:
        names += [field_name("scores", i) for i in sorted(plan["scores"])]
    names += [field_name(kind, i) for kind in sorted(plan["layers"]) for i in sorted(plan["layers"][kind])]
    if plan["logits"]:
        names.append(field_name("logits"))
    return names


# ---------------------------------------------------------------- the registry


@dataclass
class LossTerm:
    kind: str
    weight: float = 1.0
    pairs: list[tuple[int, int]] = field(default_factory=list)  # (student layer, teacher layer), 0-based
    temperature: float = 1.0
    times_t2: bool = False  # multiply the soft loss by T² (Hinton / PKD / BERT-EMD), TinyBERT does not
    relation_heads: int | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"kind: expected one of {kinds()}, got {self.kind!r}")


@dataclass
class Inputs:
    """What a kind computes from: the student's (``s``) and teacher's (``t``) fields, the student's logits, the
    labels, the [B, L] bool mask and the loss module (its projection, shapes and EMD state)."""

    s: dict[str, torch.Tensor]
    t: dict[str, torch.Tensor]
    logits: torch.Tensor | None
    labels: torch.Tensor | None
    mask: torch.Tensor
    module: Any  # fastkd.distill.distiller.DistillModule


@dataclass(frozen=True)
class TermKind:
    name: str
    doc: str
    capture: Callable[[LossTerm, int, dict], None]  # (term, side 0=student 1=teacher, plan) -> adds to plan
    compute: Callable[[Inputs, LossTerm], torch.Tensor]
    latent: bool = True  # task-agnostic: kept by --mode general
    needs_labels: bool = False
    trains_head: bool = False  # dev accuracy means something after a stage with it
    uses_scores: bool = False  # computes attention scores q·kᵀ/√d from Q and K (not only relations of them)
    # Reads attention only through q·kᵀ of both sides (BERT-EMD's cost matrices, from the fused Q/K kernels), so a
    # family whose real scores are not q·kᵀ/√d (DeBERTa, MPNet) cannot give it: refused before training.
    qk_scores_only: bool = False
    after_step: Callable[[Any, Any], None] | None = None  # (module, dist), once per step per distinct hook
    record: Callable[[Any], dict] | None = None  # module -> extra fields of each logged metrics line
    fields: tuple[CapturedField, ...] = ()  # activations it reads beyond the built-in ones
    # (name, factory(shapes, recipe params) -> nn.Module): state kept across steps, one per name in the loss module
    state: tuple[str, Callable[[Any, Any], Any]] | None = None


KINDS: dict[str, TermKind] = {}
FIELDS: dict[str, CapturedField] = {}  # filled by register_kind from each kind's ``fields``


def register_kind(kind: TermKind) -> TermKind:
    """Adds a loss kind, and the activation fields it declares, to the registry."""
    if kind.name in KINDS:
        raise ValueError(f"kind: {kind.name!r} is registered twice")
    for f in kind.fields:
        known = FIELDS.get(f.name)
        if f.name in BUILTIN_SEQ_DIMS or (known is not None and known != f):
            raise ValueError(f"fields: {f.name!r} is already a captured field, with another definition")
    KINDS[kind.name] = kind
    FIELDS.update({f.name: f for f in kind.fields})
    return kind


def kinds() -> tuple[str, ...]:
    """The registered kinds' names, read at each call (a kind registered later is included)."""
    return tuple(KINDS)


def kind_of(term: LossTerm | str) -> TermKind:
    return KINDS[term if isinstance(term, str) else term.kind]


def captured_field(name: str) -> CapturedField:
    """A kind-declared activation field (not a built-in one) by name."""
    if name not in FIELDS:
        raise ValueError(f"field: {name!r} is neither built in ({', '.join(BUILTIN_SEQ_DIMS)}) nor declared by a "
                         f"registered loss kind")
    return FIELDS[name]


def capture_plan(terms: list[LossTerm], side: str) -> dict[str, Any]:
    """What one side ("student" or "teacher") must record for ``terms`` (see :func:`empty_plan`)."""
    plan = empty_plan()
    for t in terms:
        kind_of(t).capture(t, 0 if side == "student" else 1, plan)
    return plan


def stage_fields(terms: list[LossTerm], side: str, n_layers: int, real_scores: bool = False) -> list[str]:
    """The field names one side records for ``terms`` (``real_scores``: see :func:`plan_fields`)."""
    return plan_fields(capture_plan(terms, side), n_layers, real_scores)


# ---------------------------------------------------------------- what each kind reads


def _add_qkv(plan: dict, layer: int, letters: str) -> None:
    plan["qkv"][layer] = "".join(sorted(set(plan["qkv"].get(layer, "")) | set(letters)))


def _reads_qkv(letters: str):
    def capture(term: LossTerm, side: int, plan: dict) -> None:
        for p in term.pairs:
            _add_qkv(plan, p[side], letters)

    return capture


def _reads_scores(term: LossTerm, side: int, plan: dict) -> None:
    plan["scores"].update(p[side] for p in term.pairs)


def _reads_hidden(term: LossTerm, side: int, plan: dict) -> None:
    plan["hidden"].update(p[side] for p in term.pairs)


def _reads(key: str):
    def capture(term: LossTerm, side: int, plan: dict) -> None:
        plan[key] = True

    return capture


def reads_layers(name: str):
    """The capture of a kind that reads a declared field (:class:`CapturedField`) at each pair's layer."""
    def capture(term: LossTerm, side: int, plan: dict) -> None:
        plan["layers"].setdefault(name, set()).update(p[side] for p in term.pairs)

    return capture


# ---------------------------------------------------------------- how each kind is computed


def _to_tokens(x: torch.Tensor) -> torch.Tensor:
    """[B, H, L, d] per-head projections back to [B, L, H·d] (MiniLM relations re-split them)."""
    B, H, L, d = x.shape
    return x.transpose(1, 2).reshape(B, L, H * d)


def _emb_mse(x: Inputs, term: LossTerm) -> torch.Tensor:
    h, w, b = x.module.project(x.s["emb"])
    return losses.hidden_mse(h, x.t["emb"], w, b, x.mask)


def _hidden_mse(x: Inputs, term: LossTerm) -> torch.Tensor:
    hs = torch.stack([x.s[field_name("hidden", i)] for i, _ in term.pairs])
    ht = torch.stack([x.t[field_name("hidden", j)] for _, j in term.pairs])
    K = len(term.pairs)
    w = b = None
    if x.module.fit is not None:
        _, w, b = x.module.project(hs)
        w, b = w.expand(K, -1, -1), b.expand(K, -1)
    return losses.hidden_mse(hs, ht, w, b, x.mask) * K  # summed over layers, as TinyBERT


def _attention(name: str):
    """The fused loss on Q/K of both sides; where a side has its model's real scores (DeBERTa, MPNet), the
    score-map form of the same loss, with the other side's scores materialised from its Q and K."""
    def compute(x: Inputs, term: LossTerm) -> torch.Tensor:
        total = 0.0
        for i, j in term.pairs:
            ss, st = x.s.get(field_name("scores", i)), x.t.get(field_name("scores", j))
            if ss is None and st is None:
                fn = getattr(losses, name)  # looked up per call, so a test can wrap the public loss
                total = total + fn(x.s[field_name("q", i)], x.s[field_name("k", i)], x.t[field_name("q", j)],
                                   x.t[field_name("k", j)], x.mask)
                continue
            if ss is None:
                ss = losses.attention_scores(x.s[field_name("q", i)], x.s[field_name("k", i)])
            if st is None:
                st = losses.attention_scores(x.t[field_name("q", j)], x.t[field_name("k", j)])
            total = total + getattr(losses, f"{name}_maps")(ss, st, x.mask)
        return total

    return compute


def _value_kl(x: Inputs, term: LossTerm) -> torch.Tensor:
    return sum(losses.relation_kl(_to_tokens(x.s[field_name("v", i)]), _to_tokens(x.t[field_name("v", j)]),
                                  x.module.shapes.student_heads, x.mask) for i, j in term.pairs)


def _qkv_relation(x: Inputs, term: LossTerm) -> torch.Tensor:
    return sum(losses.relation_kl(_to_tokens(x.s[field_name(c, i)]), _to_tokens(x.t[field_name(c, j)]),
                                  term.relation_heads, x.mask) / 3.0
               for i, j in term.pairs for c in "qkv")


def _pkd(x: Inputs, term: LossTerm) -> torch.Tensor:
    hs = torch.stack([x.s[field_name("hidden", i)][:, 0] for i, _ in term.pairs])
    ht = torch.stack([x.t[field_name("hidden", j)][:, 0] for _, j in term.pairs])
    if x.module.fit is not None:  # a narrower student (recipe's project_width): compare W·[CLS]
        _, w, b = x.module.project(hs)
        hs = F.linear(hs, w, b)
    return losses.pkd_mse(hs, ht)


def _emd(side: str):
    """BERT-EMD: all M×N layer costs at once from Gram matrices (fastkd.losses.emd_costs), then the transport
    plan between the layer weights; the plan and costs are kept for the after-step weight update."""

    def compute(x: Inputs, term: LossTerm) -> torch.Tensor:
        m, state = x.module, x.module.states["emd"]
        n_s, n_t = m.shapes.student_layers, m.shapes.teacher_layers
        if side == "att":
            q_s = torch.stack([x.s[field_name("q", i)] for i in range(n_s)])
            k_s = torch.stack([x.s[field_name("k", i)] for i in range(n_s)])
            q_t = torch.stack([x.t[field_name("q", j)] for j in range(n_t)]).to(q_s.dtype)
            k_t = torch.stack([x.t[field_name("k", j)] for j in range(n_t)]).to(k_s.dtype)
            cost = losses.layer_costs(q_s=q_s, k_s=k_s, q_t=q_t, k_t=k_t, mask=x.mask)[1]
        else:
            h_s = torch.stack([x.s[field_name("hidden", i)] for i in range(n_s)])
            _, w, b = m.project(h_s[0])
            h_t = torch.stack([x.t[field_name("hidden", j)] for j in range(n_t)]).to(h_s.dtype)
            cost = losses.layer_costs(h_s=h_s, h_t=h_t, weight=w, bias=b, mask=x.mask)[0]
        cost = cost.float()  # [M, N]
        loss, plan = losses.emd_loss(cost[None], state.w_s[None].float(), state.w_t[None].float(),
                                     eps=state.eps, iters=state.iters)
        state.last[term.kind] = (plan[0].detach(), cost.detach())
        return loss[0]

    return compute


@torch.no_grad()
def update_emd_weights(module, dist) -> None:
    """After an optimizer step: cost attention on the attention and hidden EMD problems, averaged (over ranks
    too, so every rank keeps the same weights)."""
    state = module.states["emd"]
    if not state.last:
        return
    new_s, new_t = [], []
    for plan, cost in state.last.values():
        pc = dist.all_mean(torch.stack([plan, cost]))
        ws, wt = update_layer_weights(pc[0], pc[1], state.w_s, state.w_t)
        new_s.append(ws)
        new_t.append(wt)
    state.w_s.copy_(torch.stack(new_s).mean(0))
    state.w_t.copy_(torch.stack(new_t).mean(0))
    state.last.clear()


def _emd_record(module) -> dict:
    state = module.states["emd"]
    return {"emd_w_s": state.w_s.tolist(), "emd_w_t": state.w_t.tolist()}


def _soft_ce(x: Inputs, term: LossTerm) -> torch.Tensor:
    if x.logits.shape[-1] == 1:  # a regression head: TinyBERT's prediction loss is MSE to the teacher's output
        # (s − t)² rather than F.mse_loss, which saves the teacher's (inference-mode) tensor for backward.
        return (x.logits.float().squeeze(-1) - x.t["logits"].float().squeeze(-1)).pow(2).mean()
    val = losses.soft_cross_entropy(x.logits.float(), x.t["logits"].float(), term.temperature)
    return val * term.temperature ** 2 if term.times_t2 else val


def _hard_ce(x: Inputs, term: LossTerm) -> torch.Tensor:
    if x.labels is None:
        raise ValueError("hard_ce: this stage needs labels but the data has none")
    if x.logits.shape[-1] == 1:  # regression: MSE to the gold value
        return F.mse_loss(x.logits.float().squeeze(-1), x.labels.float())
    if x.labels.is_floating_point():
        raise ValueError(f"labels: the student has a {x.logits.shape[-1]}-way classifier but the labels are real "
                         f"numbers ({x.labels.dtype}); for a regression task give the student and teacher one output "
                         f"(num_labels=1), for classification pass integer class ids")
    return F.cross_entropy(x.logits.float(), x.labels)


def _nothing(term: LossTerm, side: int, plan: dict) -> None:
    """Reads only the student's logits, which every forward returns."""


for _kind in (
    TermKind("emb_mse", "TinyBERT embedding loss: hidden_mse(W·emb_s, emb_t)", _reads("embeddings"), _emb_mse),
    TermKind("hidden_mse", "TinyBERT hidden loss over `pairs`: hidden_mse(W·h_s,i, h_t,j)", _reads_hidden,
             _hidden_mse),
    TermKind("att_mse", "TinyBERT attention-score MSE over `pairs` (needs equal head counts)", _reads_scores,
             _attention("attention_mse"), uses_scores=True),
    TermKind("att_kl", "MiniLM attention-distribution KL over `pairs` (needs equal head counts)", _reads_scores,
             _attention("attention_kl"), uses_scores=True),
    TermKind("value_kl", "MiniLM value-relation KL over `pairs`", _reads_qkv("v"), _value_kl),
    TermKind("qkv_relation", "MiniLMv2 Q-Q/K-K/V-V relation KL (1/3 each) with `relation_heads` heads",
             _reads_qkv("qkv"), _qkv_relation),
    TermKind("pkd", "Patient-KD normalised [CLS] MSE over `pairs` (a narrower student's [CLS] goes through W)",
             _reads_hidden, _pkd),
    TermKind("emd_att", "BERT-EMD many-to-many attention-score EMD", _reads("all_qk"), _emd("att"),
             after_step=update_emd_weights, record=_emd_record, uses_scores=True, qk_scores_only=True,
             state=("emd", EMDState)),
    TermKind("emd_hidden", "BERT-EMD many-to-many hidden-state EMD", _reads("all_hidden"), _emd("hidden"),
             after_step=update_emd_weights, record=_emd_record, state=("emd", EMDState)),
    TermKind("soft_ce", "prediction-layer soft_cross_entropy(s/T, t/T), × T² when `times_t2` (MSE for a "
             "one-output regression head)",
             _reads("logits"), _soft_ce, latent=False, trains_head=True),
    TermKind("hard_ce", "cross entropy with the gold labels (MSE for a one-output regression head)", _nothing,
             _hard_ce, latent=False, needs_labels=True,
             trains_head=True),
):
    register_kind(_kind)
