"""The loss module: the student, the recipe's trainable extras, and the stage's terms summed over captured
activations; ``forward`` returns (total, {kind: weighted value})."""

from __future__ import annotations

import torch
from torch import nn

from fastkd.capture import capture_fields
from fastkd.checks import value_checks
from fastkd.families import check_window, has_real_scores
from fastkd.recipes import Recipe, Shapes, Stage
from fastkd.terms import Inputs, LossTerm, kind_of, stage_fields


class DistillModule(nn.Module):
    """Student + the recipe's trainable extras (TinyBERT's fit_dense) and BERT-EMD's layer weights."""

    def __init__(self, student: nn.Module, shapes: Shapes, recipe: Recipe, kept_hidden: torch.Tensor | None = None):
        super().__init__()
        self.real_scores = has_real_scores(student.config)  # DeBERTa, MPNet: their attention terms read score maps
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
        # Each stateful kind's state (BERT-EMD's layer weights), made by the kind's own factory, once per name.
        factories = {kind_of(t).state[0]: kind_of(t).state[1] for s in recipe.stages for t in s.terms
                     if kind_of(t).state is not None}
        self.states = nn.ModuleDict({name: make(shapes, recipe.params) for name, make in factories.items()})
        self.terms: list[LossTerm] = []
        self.student_fields: list[str] = []
        self.window_checks: list[tuple] = []  # (config, layers, what): score terms on sliding-window layers

    def set_stage(self, stage: Stage) -> None:
        self.terms = stage.terms
        fields = stage_fields(stage.terms, "student", self.shapes.student_layers, real_scores=self.real_scores)
        self.student_fields = [f for f in fields if f != "logits"]

    def after_step(self, dist) -> None:
        """The stage's after-step hooks (BERT-EMD's weight update), each once."""
        for hook in dict.fromkeys(kind_of(t).after_step for t in self.terms if kind_of(t).after_step):
            hook(self, dist)

    def record(self) -> dict:
        """Extra fields the stage's kinds add to a logged metrics line (BERT-EMD's layer weights)."""
        out: dict = {}
        for t in self.terms:
            if kind_of(t).record is not None:
                out.update(kind_of(t).record(self))
        return out

    def project(self, h):
        """(h, W, b) of TinyBERT's fit_dense in h's dtype, or (h, None, None) at equal widths."""
        if self.fit is None:
            return h, None, None
        return h, self.fit.weight.to(h.dtype), self.fit.bias.to(h.dtype)

    def forward(self, input_ids, attention_mask, labels, teacher: dict[str, torch.Tensor], token_type_ids=None):
        total, terms, _ = self.distill(input_ids, attention_mask, labels, teacher, token_type_ids)
        return total, terms

    def distill(self, input_ids, attention_mask, labels, teacher: dict[str, torch.Tensor], token_type_ids=None):
        """(total, {kind: weighted value}, the student's logits or None) of the stage's terms on one batch."""
        mask = attention_mask.bool()
        for config, layers, what in self.window_checks:
            check_window(config, layers, input_ids.shape[1], what)
        segments = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        with capture_fields(self.student, self.student_fields) as read:
            out = self.student(input_ids=input_ids, attention_mask=attention_mask, **segments)
            s = read(out)
        inputs = Inputs(s, teacher, getattr(out, "logits", None), labels, mask, self)
        # The collator's masks always hold [CLS]: skip the per-call mask value checks (each is a host sync).
        # The losses run outside autocast: the teacher's tensors are half precision (an fp16/bf16 teacher or the
        # cache), and under autocast torch.stack/cat refuse a dtype other than autocast's own ("Unexpected
        # floating ScalarType in at::autocast::prioritize"), so fp16 teacher + bf16 AMP -- the GPU defaults --
        # failed. Each loss computes in fp32 internally; the fused kernels take mixed dtypes. Teacher tensors go
        # in as they are: casting them to the student's dtype would only cost a copy each (and round fp16 to bf16).
        terms: dict[str, torch.Tensor] = {}
        with value_checks(False), torch.autocast(input_ids.device.type, enabled=False):
            for term in self.terms:
                terms[term.kind] = terms.get(term.kind, 0.0) + term.weight * kind_of(term).compute(inputs, term)
        return sum(terms.values()), terms, inputs.logits
