"""``fastkd.Distiller``: one method's distillation for any training loop (a plain loop, Lightning, the HF Trainer).

>>> distiller = Distiller(teacher, student, method="tinybert")
>>> opt = torch.optim.AdamW(distiller.trainable_parameters(), lr=5e-5)
>>> for stage in distiller.stages:                 # TinyBERT: intermediate, then prediction
...     distiller.set_stage(stage.name)
...     for batch in loader:                        # input_ids, attention_mask, labels (token_type_ids, index)
...         out = distiller(**batch)                # the frozen teacher, then the student
...         out.loss.backward(); opt.step(); opt.zero_grad(); distiller.after_step()
>>> distiller.save_student("student/", tokenizer)  # a clean transformers model: no projection, no wrapper keys

It is the trainer's loss module (:class:`fastkd.distill.distiller.DistillModule`: the student, TinyBERT's ``fit_dense``
projection, BERT-EMD's layer weights) plus the frozen teacher, which is kept outside the module's parameters,
buffers and state dict: ``.to()``, DDP, optimizers and checkpoints never see it. The teacher moves to the batch's
device on first use (``teacher_dtype``; auto: fp16 on CUDA, bf16 on a CPU with native bf16, else fp32), runs under
``inference_mode`` with hooks that capture only what the stage's losses read, never sees the labels, and its
outputs are checked finite. ``fastkd.train`` trains through this class too, so the two give the same losses.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers.utils import ModelOutput

from fastkd.cache.store import TeacherCache
from fastkd.disk import save_model_dir
from fastkd.losses.checks import value_checks
from fastkd.models.capture import capture_fields
from fastkd.models.families import attention_interface, check_window, family_of, has_real_scores, sliding_windows
from fastkd.models.teacher import TEACHER_DTYPE_CHOICES, TeacherRunner, has_task_head, teacher_dtype
from fastkd.recipes import Recipe, Shapes, Stage, build_recipe, make_params
from fastkd.terms import Inputs, LossTerm, empty_plan, kind_of, reads_score_maps, stage_fields
from fastkd.training.batching import Batch
from fastkd.training.engine import Dist, current_dist

TEACHER_KINDS = ("pretrained", "finetuned")


@dataclass
class DistillOutput(ModelOutput):
    """``loss``: the stage's weighted total; ``logits``: the student's; ``terms``: {kind: weighted value}."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    terms: dict[str, torch.Tensor] | None = None


def _encoder_config(model, argument: str):
    cfg = getattr(model, "config", None)
    need = ("num_hidden_layers", "hidden_size", "num_attention_heads")
    if not isinstance(model, nn.Module) or cfg is None or any(getattr(cfg, n, None) is None for n in need):
        raise ValueError(f"{argument}: expected a transformers encoder (a model with a config giving "
                         f"{', '.join(need)}), got {type(model).__name__}")
    return cfg


def model_shapes(teacher: nn.Module, student: nn.Module) -> Shapes:
    """What a recipe needs to know of the two models, read off their configs."""
    t, s = _encoder_config(teacher, "teacher"), _encoder_config(student, "student")
    return Shapes(t.num_hidden_layers, s.num_hidden_layers, t.hidden_size, s.hidden_size, t.num_attention_heads,
                  s.num_attention_heads)


def _teachers(teacher) -> dict[str, nn.Module]:
    """{"pretrained": m, "finetuned": m}: one model serves both unless a dict names them (ERNIE-Tiny's general
    stages read the pretrained encoder, its task stages the fine-tuned one)."""
    if isinstance(teacher, dict):
        unknown = set(teacher) - set(TEACHER_KINDS)
        if unknown or not teacher:
            raise ValueError(f"teacher: expected a model or a dict with keys from {TEACHER_KINDS}, got keys "
                             f"{sorted(teacher)}")
        one = next(iter(teacher.values()))
        return {k: teacher.get(k, one) for k in TEACHER_KINDS}
    return dict.fromkeys(TEACHER_KINDS, teacher)


def token_level_terms(recipe: Recipe) -> list[str]:
    """The recipe's kinds that read activations token by token (everything but the logit terms): they need
    both models to read the same token ids."""
    return sorted({t.kind for s in recipe.stages for t in s.terms
                   if [f for f in stage_fields([t], "student", 1) if f != "logits"]
                   or [f for f in stage_fields([t], "teacher", 1) if f != "logits"]})


def _check_vocab(teacher: nn.Module, student: nn.Module, recipe: Recipe) -> None:
    """Token-level losses compare the two models token by token, so both must read the same token ids."""
    v_t, v_s = (getattr(m.config, "vocab_size", None) for m in (teacher, student))
    token_level = token_level_terms(recipe)
    if token_level and v_t is not None and v_s is not None and v_t != v_s:
        raise ValueError(f"student: its vocabulary has {v_s} tokens and the teacher's {v_t}, so they do not share a "
                         f"tokenizer and the token-level terms {token_level} of {recipe.method} compare different "
                         f"tokens; use a student with the teacher's tokenizer, or method='kd' (logits only)")


def check_task_heads(teachers: dict[str, nn.Module], student: nn.Module, recipe: Recipe,
                     teacher_names: dict[str, str]) -> None:
    """A stage whose terms read logits needs that model's sequence-classification head: without one, its
    output has no logits (a base encoder) or logits of another task (a masked LM's vocabulary)."""
    for stage in recipe.stages:
        for who, model in (("teacher", teachers[stage.teacher]), ("student", student)):
            n = model.config.num_hidden_layers
            reading = sorted({t.kind for t in stage.terms if "logits" in stage_fields([t], who, n)})
            if not reading or has_task_head(model):
                continue
            name = teacher_names[stage.teacher] if who == "teacher" else "the student"
            fix = ("fine-tune it on the task first (AutoModelForSequenceClassification.from_pretrained(path, "
                   "num_labels=...) and a transformers Trainer; `python -m fastkd.train --teacher PATH` does this "
                   "itself and caches the result), then pass the fine-tuned model"
                   if who == "teacher" else "load it with AutoModelForSequenceClassification (num_labels=...)")
            raise ValueError(f"{who}: {name} is a {type(model).__name__}, without a sequence-classification "
                             f"head, and stage {stage.name} of {recipe.method} reads its logits "
                             f"({', '.join(reading)}); {fix}")


def _qkv_layers(term, side: int, n_layers: int) -> list[int]:
    """The layers whose Q/K/V a term reads on one side (0 student, 1 teacher)."""
    plan = empty_plan()
    kind_of(term).capture(term, side, plan)
    return list(range(n_layers)) if plan["all_qk"] else sorted(set(plan["qkv"]) | plan["scores"])


def check_families(teacher_configs: dict, student_config, recipe: Recipe) -> None:
    """Refuse, before anything runs, what a model's family cannot give: any captured activation of an
    unsupported family (logits alone need none: method kd works for any model with a head), and BERT-EMD's
    attention EMD for a family whose real scores are not q·kᵀ/√d; each error names the term, the family and
    why."""
    for stage in recipe.stages:
        for who, cfg in (("student", student_config), ("teacher", teacher_configs[stage.teacher])):
            n = cfg.num_hidden_layers
            if not [f for f in stage_fields(stage.terms, who, n) if f != "logits"]:
                continue
            family = family_of(cfg, who)
            for term in stage.terms:
                if kind_of(term).qk_scores_only and family.real_scores is not None:
                    raise ValueError(
                        f"{term.kind} (stage {stage.name} of {recipe.method}): the {who} is a {cfg.model_type} "
                        f"model, and its real attention scores are not q·kᵀ/√d, while BERT-EMD's attention cost "
                        f"matrices come from the fused Q/K kernels; fastkd will not compute this term from the "
                        f"wrong scores. Use another method (tinybert and minilm read the real scores)")


def window_checks(teacher: nn.Module, student: nn.Module, stage: Stage) -> list[tuple]:
    """(config, layers, what) for the score terms on sliding-window layers (ModernBERT's local layers): each
    batch is checked against the window (:func:`fastkd.models.families.check_window`)."""
    out = []
    for side, model in ((0, student), (1, teacher)):
        windows = sliding_windows(model.config)
        for term in stage.terms:
            layers = [i for i in _qkv_layers(term, side, model.config.num_hidden_layers) if i in windows]
            if windows and kind_of(term).uses_scores and layers:
                out.append((model.config, layers, f"{term.kind} ({'teacher' if side else 'student'})"))
    return out


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


class Distiller(DistillModule):
    """The student, the recipe's trainable extras and the frozen teacher; ``distiller(**batch)`` returns a
    :class:`DistillOutput`. ``method``: a registered method name or a :class:`fastkd.recipes.Recipe`;
    ``settings``: the method's overrides ({"tinybert.att_weight": 2}); ``kept_hidden``: an ETD student's kept
    teacher hidden dims (``extract_student(..., return_plan=True)[1].hidden``), which start the projection as
    that selection; ``cache="memory"`` keeps the teacher's activations of each example (batches then need an
    ``index`` of example ids, as :func:`fastkd.data.tokenize` adds) so later epochs skip the teacher."""

    def __init__(self, teacher, student: nn.Module, method: str | Recipe = "kd", *, settings: dict | None = None,
                 mode: str = "task", kept_hidden: torch.Tensor | None = None, teacher_dtype: str = "auto",
                 cache: str = "off", teacher_names: dict[str, str] | None = None, epochs: int | None = None):
        teachers = _teachers(teacher)
        shapes = model_shapes(teachers["finetuned"], student)
        if isinstance(method, Recipe):
            recipe = method
        else:
            recipe = build_recipe(method, shapes, make_params(method, settings), mode=mode, epochs=epochs)
        if teacher_dtype not in TEACHER_DTYPE_CHOICES:
            raise ValueError(f"teacher_dtype: expected one of {TEACHER_DTYPE_CHOICES}, got "
                             f"{teacher_dtype!r}")
        if cache not in ("off", "memory"):
            raise ValueError(f"cache: expected 'off' or 'memory', got {cache!r}")
        _check_vocab(teachers["finetuned"], student, recipe)
        check_families({k: t.config for k, t in teachers.items()}, student.config, recipe)
        teacher_names = teacher_names or {k: f"the {k} teacher" for k in TEACHER_KINDS}
        check_task_heads(teachers, student, recipe, teacher_names)
        super().__init__(student, shapes, recipe, kept_hidden)
        for t in teachers.values():
            t.eval().requires_grad_(False)
        # A plain dict is not registered: the teachers stay out of parameters(), state_dict(), .to() and DDP.
        self.teachers = teachers
        self.recipe = recipe
        self.teacher_dtype = teacher_dtype
        self.cache_mode = cache
        self.teacher_names = teacher_names
        self.stage_index = -1
        self.runner: TeacherRunner | None = None
        self.set_stage(0)

    # ------------------------------------------------------------ stages

    @property
    def stages(self) -> list[Stage]:
        """The method's stages in order (name, terms, epochs, lr, teacher, data): TinyBERT has two, ERNIE-Tiny
        four, KD one. Train each in turn after :meth:`set_stage`; every stage starts a fresh optimizer in
        ``fastkd.train``."""
        return self.recipe.stages

    @property
    def stage(self) -> Stage:
        return self.recipe.stages[self.stage_index]

    def set_stage(self, stage: int | str | Stage, cache=None) -> None:
        """Switch to a stage (its index, name or itself). ``cache``: an activation cache for it (fastkd.train
        passes its own); by default a fresh one when the distiller was made with ``cache="memory"``."""
        names = [s.name for s in self.stages]
        if isinstance(stage, Stage):
            stage = self.stages.index(stage)
        elif isinstance(stage, str):
            if stage not in names:
                raise ValueError(f"stage: expected one of {names}, got {stage!r}")
            stage = names.index(stage)
        elif not isinstance(stage, int) or not 0 <= stage < len(self.stages):
            raise ValueError(f"stage: expected a stage name in {names} or an index 0..{len(names) - 1}, got {stage!r}")
        super().set_stage(self.stages[stage])
        self.stage_index = stage
        self.window_checks = window_checks(self.teachers[self.stage.teacher], self.student, self.stage)
        fields = self.teacher_fields()
        if self.cache_mode == "memory" and reads_score_maps(fields):
            raise ValueError("cache: this stage reads the teacher's real [B, H, L, L] attention scores, which the "
                             "activation cache does not hold; use cache='off'")
        if cache is None and self.cache_mode == "memory" and fields:
            cache = TeacherCache("memory", dtype=torch.bfloat16 if self.teacher_dtype == "bf16" else torch.float16)
        kind = self.stage.teacher
        self.runner = TeacherRunner(self.teachers[kind], fields, cache, name=self.teacher_names[kind])

    def teacher_fields(self, stage: Stage | None = None) -> list[str]:
        """What a stage's losses read from the teacher (field names, see :mod:`fastkd.terms`)."""
        stage = stage or self.stage
        return stage_fields(stage.terms, "teacher", self.shapes.teacher_layers,
                            real_scores=has_real_scores(self.teachers[stage.teacher].config))

    # ------------------------------------------------------------ the forward

    def _place(self, teacher: nn.Module, device: torch.device) -> None:
        p = next(teacher.parameters(), None)
        if p is not None and p.device != device:
            teacher.to(device=device, dtype=teacher_dtype(self.teacher_dtype, device))

    def teacher_outputs(self, batch: Batch, host: Batch | None = None) -> dict[str, torch.Tensor]:
        """The stage's teacher activations for a batch: cached, or a live frozen forward (in its own dtype,
        outside any autocast, without the labels). ``host``: the batch's CPU copy, for cache look-ups."""
        if self.runner.cache is not None and batch.index is None:
            raise ValueError("index: the activation cache keys examples by a per-example `index` (an int column, "
                             "as fastkd.data.tokenize adds); pass it in the batch, or use cache='off'")
        self._place(self.runner.teacher, batch.input_ids.device)
        with torch.autocast(batch.input_ids.device.type, enabled=False):
            return self.runner(batch, host)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                index: torch.Tensor | None = None, teacher_outputs: dict[str, torch.Tensor] | None = None
                ) -> DistillOutput:
        """The stage's losses on one batch. ``teacher_outputs``: the teacher's activations when the caller ran
        it already (fastkd.train does, outside DDP); else the teacher runs here. A batch dict (or a fastkd
        ``Batch``) may also be passed whole: ``distiller(batch)``."""
        if isinstance(input_ids, Batch):
            input_ids = {**input_ids.model_inputs(), "labels": input_ids.labels, "index": input_ids.index}
        if isinstance(input_ids, Mapping):
            return self.forward(**input_ids)
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            raise ValueError(f"input_ids: expected a [batch, tokens] tensor of token ids, got "
                             f"{getattr(input_ids, 'shape', type(input_ids).__name__)}")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if teacher_outputs is None:
            batch = Batch(index, input_ids, attention_mask, labels, token_type_ids)
            teacher_outputs = self.teacher_outputs(batch)
        total, terms, logits = self.distill(input_ids, attention_mask, labels, teacher_outputs, token_type_ids)
        return DistillOutput(loss=total, logits=logits, terms=terms)

    def score_path_note(self) -> str | None:
        """What the attention terms run on, where it is not the default: which sides read real score maps
        (unfused, O(B·H·L²) memory) and which models run eager attention because their family has no SDPA."""
        models = (("teacher", self.teachers["finetuned"]), ("student", self.student))
        lines = [f"{who}: {m.config.model_type} runs eager attention (fastkd loads it so: transformers has no SDPA "
                 f"path for it)" for who, m in models if getattr(m.config, "_attn_implementation", None) == "eager"
                 and attention_interface(m.config) == "eager"]
        sides = [f"the {who} ({m.config.model_type})" for who, m in models if has_real_scores(m.config)]
        if sides and any(kind_of(t).uses_scores for s in self.stages for t in s.terms):
            lines.append(f"attention terms: {' and '.join(sides)} attend with more than q·kᵀ/√d (relative-position "
                         f"terms), so those terms read the model's real [B, H, L, L] scores through the reference "
                         f"path, not the fused kernels: O(B·H·L²) memory per mapped layer, and no activation cache "
                         f"for them")
        return "\n".join(lines) or None

    # ------------------------------------------------------------ training-loop hooks and the result

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The student's parameters plus the recipe's projection (never the teacher's)."""
        return [p for p in self.parameters() if p.requires_grad]

    def after_step(self, dist: Dist | None = None) -> None:
        """Call after each optimizer step: BERT-EMD's layer-weight update (averaged over ranks when a process
        group is running); a no-op for the other methods."""
        super().after_step(dist if dist is not None else current_dist())

    def student_state(self) -> dict[str, torch.Tensor]:
        """The student's own state dict: the keys ``from_pretrained`` expects, nothing of the distiller."""
        return self.student.state_dict()

    def extras_state(self) -> dict[str, torch.Tensor]:
        """Everything of the distiller but the student (projection, EMD layer weights): what a resume needs."""
        return split_student_state(self.state_dict())[1]

    def save_student(self, folder: str | Path, tokenizer=None, state_dict: dict | None = None) -> Path:
        """Write the student (``save_pretrained``, plus the tokenizer when given) into ``folder``, atomically.
        ``state_dict``: the distiller's full state dict when its parameters are sharded (FSDP: gathered with
        ``get_model_state_dict(..., full_state_dict=True)``); its ``student.`` keys are written."""
        folder = Path(folder)
        folder.parent.mkdir(parents=True, exist_ok=True)
        student = None if state_dict is None else split_student_state(state_dict)[0]
        save_model_dir(folder, _Saver(self.student, student), *([tokenizer] if tokenizer is not None else []))
        return folder


def split_student_state(state_dict: dict) -> tuple[dict, dict]:
    """(the student's own state dict, without the ``student.`` prefix: what ``from_pretrained`` expects; the
    distiller's other entries: projection, stateful kinds' state) of a distiller's full state dict."""
    student = {k[len("student."):]: v for k, v in state_dict.items() if k.startswith("student.")}
    return student, {k: v for k, v in state_dict.items() if not k.startswith("student.")}


class _Saver:
    """``save_pretrained`` of a model with a given state dict (None: its own)."""

    def __init__(self, model: nn.Module, state_dict: dict | None):
        self.model, self.state_dict = model, state_dict

    def save_pretrained(self, folder) -> None:
        self.model.save_pretrained(folder, state_dict=self.state_dict)
