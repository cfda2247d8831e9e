"""The recipe's loss terms computed on captured activations: field names and :class:`DistillModule`."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastkd import losses
from fastkd.capture import capture_fields
from fastkd.checks import value_checks
from fastkd.emd import update_layer_weights
from fastkd.engine import Dist
from fastkd.recipes import LossTerm, Recipe, Shapes, Stage, capture_plan

# ---------------------------------------------------------------- teacher activations


SEQ_DIMS = {"emb": 1, "hidden": 1, "q": 2, "k": 2, "v": 2, "logits": None}


def seq_dim(name: str) -> int | None:
    return SEQ_DIMS[name.split(".")[0]]


def plan_fields(plan: dict, n_layers: int) -> list[str]:
    names = ["emb"] if plan["embeddings"] else []
    hidden = set(range(n_layers)) if plan["all_hidden"] else set(plan["hidden"])
    names += [f"hidden.{i}" for i in sorted(hidden)]
    qkv = {i: set(s) for i, s in plan["qkv"].items()}
    if plan["all_qk"]:
        for i in range(n_layers):
            qkv.setdefault(i, set()).update("qk")
    names += [f"{c}.{i}" for i in sorted(qkv) for c in sorted(qkv[i])]
    if plan["logits"]:
        names.append("logits")
    return names


# ---------------------------------------------------------------- the loss module


def _to_tokens(x: torch.Tensor) -> torch.Tensor:
    """[B, H, L, d] per-head projections back to [B, L, H·d] (MiniLM relations re-split them)."""
    B, H, L, d = x.shape
    return x.transpose(1, 2).reshape(B, L, H * d)


class DistillModule(nn.Module):
    """Student + the recipe's trainable extras (TinyBERT's fit_dense); forward returns (total, terms)."""

    def __init__(self, student: nn.Module, shapes: Shapes, recipe: Recipe, kept_hidden: torch.Tensor | None = None):
        super().__init__()
        self.student = student
        self.shapes = shapes
        self.fit = nn.Linear(shapes.student_hidden, shapes.teacher_hidden) \
            if shapes.student_hidden != shapes.teacher_hidden else None
        if self.fit is not None and kept_hidden is not None:
            # An ETD student's hidden dim j is the teacher's dim kept_hidden[j]: start the projection as that
            # selection, so the hidden losses begin from what extraction preserved instead of a random map.
            with torch.no_grad():
                self.fit.weight.zero_()
                self.fit.weight[kept_hidden.long(), torch.arange(shapes.student_hidden)] = 1.0
                self.fit.bias.zero_()
        self.has_emd = any(t.kind.startswith("emd_") for s in recipe.stages for t in s.terms)
        n_s, n_t = shapes.student_layers, shapes.teacher_layers
        self.register_buffer("emd_w_s", torch.full((n_s,), 1.0 / n_s))
        self.register_buffer("emd_w_t", torch.full((n_t,), 1.0 / n_t))
        self.terms: list[LossTerm] = []
        self.student_fields: list[str] = []
        self.emd_last: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.emd_eps = getattr(recipe.params, "sinkhorn_eps", None)
        self.emd_iters = getattr(recipe.params, "sinkhorn_iters", None)

    def set_stage(self, stage: Stage):
        self.terms = stage.terms
        fields = plan_fields(capture_plan(stage.terms, "student"), self.shapes.student_layers)
        self.student_fields = [f for f in fields if f != "logits"]

    def _project(self, h):
        if self.fit is None:
            return h, None, None
        return h, self.fit.weight.to(h.dtype), self.fit.bias.to(h.dtype)

    def forward(self, input_ids, attention_mask, labels, teacher: dict[str, torch.Tensor], token_type_ids=None):
        mask = attention_mask.bool()
        segments = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        with capture_fields(self.student, self.student_fields) as read:
            out = self.student(input_ids=input_ids, attention_mask=attention_mask, **segments)
            s = read(out)
        logits = getattr(out, "logits", None)
        # The collator's masks always hold [CLS]: skip the per-call mask value checks (each is a host sync).
        # The losses run outside autocast: the teacher's tensors are half precision (an fp16/bf16 teacher or the
        # cache), and under autocast torch.stack/cat refuse a dtype other than autocast's own ("Unexpected
        # floating ScalarType in at::autocast::prioritize"), so fp16 teacher + bf16 AMP -- the GPU defaults --
        # failed. Each loss computes in fp32 internally; the fused kernels take mixed dtypes.
        with value_checks(False), torch.autocast(input_ids.device.type, enabled=False):
            return self._terms(s, teacher, logits, labels, mask)

    def _terms(self, s, t, logits, labels, mask):
        terms: dict[str, torch.Tensor] = {}
        # Teacher tensors go in as they are (fp16/bf16 from a half-precision teacher or the cache): every loss
        # takes mixed dtypes and accumulates in fp32, so casting them to the student's dtype first would only
        # cost a copy of each per step (and round fp16 to bf16).
        for term in self.terms:
            k = term.kind
            if k == "emb_mse":
                h, w, b = self._project(s["emb"])
                val = losses.hidden_mse(h, t["emb"], w, b, mask)
            elif k == "hidden_mse":
                hs = torch.stack([s[f"hidden.{i}"] for i, _ in term.pairs])
                ht = torch.stack([t[f"hidden.{j}"] for _, j in term.pairs])
                K = len(term.pairs)
                w = b = None
                if self.fit is not None:
                    _, w, b = self._project(hs)
                    w, b = w.expand(K, -1, -1), b.expand(K, -1)
                val = losses.hidden_mse(hs, ht, w, b, mask) * K  # summed over layers, as TinyBERT
            elif k in ("att_mse", "att_kl"):
                fn = losses.attention_mse if k == "att_mse" else losses.attention_kl
                val = sum(fn(s[f"q.{i}"], s[f"k.{i}"], t[f"q.{j}"], t[f"k.{j}"], mask) for i, j in term.pairs)
            elif k == "value_kl":
                val = sum(losses.relation_kl(_to_tokens(s[f"v.{i}"]), _to_tokens(t[f"v.{j}"]),
                                             self.shapes.student_heads, mask) for i, j in term.pairs)
            elif k == "qkv_relation":
                val = sum(losses.relation_kl(_to_tokens(s[f"{c}.{i}"]),
                                             _to_tokens(t[f"{c}.{j}"]),
                                             term.relation_heads, mask) / 3.0
                          for i, j in term.pairs for c in "qkv")
            elif k == "pkd":
                hs = torch.stack([s[f"hidden.{i}"][:, 0] for i, _ in term.pairs])
                ht = torch.stack([t[f"hidden.{j}"][:, 0] for _, j in term.pairs])
                if self.fit is not None:  # a narrower student (recipe's project_width): compare W·[CLS]
                    _, w, b = self._project(hs)
                    hs = torch.nn.functional.linear(hs, w, b)
                val = losses.pkd_mse(hs, ht)
            elif k in ("emd_att", "emd_hidden"):
                val = self._emd(k, s, t, mask)
            elif k == "soft_ce":
                val = losses.soft_cross_entropy(logits.float(), t["logits"].float(), term.temperature)
                if term.times_t2:
                    val = val * term.temperature ** 2
            elif k == "hard_ce":
                if labels is None:
                    raise ValueError("hard_ce: this stage needs labels but the data has none")
                val = F.cross_entropy(logits.float(), labels)
            else:  # pragma: no cover - recipes validate kinds
                raise ValueError(f"unknown loss kind {k!r}")
            terms[k] = terms.get(k, 0.0) + term.weight * val
        total = sum(terms.values())
        return total, terms

    def _emd(self, kind, s, t, mask):
        n_s, n_t = self.shapes.student_layers, self.shapes.teacher_layers
        # All M×N costs at once from Gram matrices (fastkd.losses.layer_costs), not M·N loss calls.
        if kind == "emd_att":
            q_s = torch.stack([s[f"q.{i}"] for i in range(n_s)])
            k_s = torch.stack([s[f"k.{i}"] for i in range(n_s)])
            q_t = torch.stack([t[f"q.{j}"] for j in range(n_t)]).to(q_s.dtype)
            k_t = torch.stack([t[f"k.{j}"] for j in range(n_t)]).to(k_s.dtype)
            cost = losses.layer_costs(q_s=q_s, k_s=k_s, q_t=q_t, k_t=k_t, mask=mask)[1]
        else:
            h_s = torch.stack([s[f"hidden.{i}"] for i in range(n_s)])
            _, w, b = self._project(h_s[0])
            h_t = torch.stack([t[f"hidden.{j}"] for j in range(n_t)]).to(h_s.dtype)
            cost = losses.layer_costs(h_s=h_s, h_t=h_t, weight=w, bias=b, mask=mask)[0]
        cost = cost.float()  # [M, N]
        loss, plan = losses.emd_loss(cost[None], self.emd_w_s[None].float(), self.emd_w_t[None].float(),
                                     eps=self.emd_eps, iters=self.emd_iters)
        self.emd_last[kind] = (plan[0].detach(), cost.detach())
        return loss[0]

    @torch.no_grad()
    def update_emd_weights(self, dist: Dist):
        """After an optimizer step: cost attention on the attention and hidden EMD problems, averaged."""
        if not self.emd_last:
            return
        new_s, new_t = [], []
        for plan, cost in self.emd_last.values():
            if dist.enabled:  # every rank must agree on the weights: use the mean plan·cost
                import torch.distributed as tdist

                pc = torch.stack([plan, cost])
                tdist.all_reduce(pc)
                plan, cost = pc[0] / dist.world_size, pc[1] / dist.world_size
            ws, wt = update_layer_weights(plan, cost, self.emd_w_s, self.emd_w_t)
            new_s.append(ws)
            new_t.append(wt)
        self.emd_w_s.copy_(torch.stack(new_s).mean(0))
        self.emd_w_t.copy_(torch.stack(new_t).mean(0))
        self.emd_last.clear()


