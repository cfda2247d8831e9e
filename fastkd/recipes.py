"""Distillation methods as small declarative recipes.

A :class:`Recipe` is a list of :class:`Stage` s; a stage says which teacher it uses (the pretrained encoder or
the task-fine-tuned one), which data (the task's labelled data or a general unlabelled corpus), how long and at
which learning rate it trains, and which :class:`LossTerm` s it sums. A loss term names one ``fastkd.losses``
function, its weight and its (student layer, teacher layer) mapping. The trainer derives from the terms what
to capture from each model, so a teacher forward never records more than the recipe reads.

Each method's paper defaults live in a ``*Params`` dataclass; every field can be overridden from the CLI
(``--set tinybert.att_weight=2``) or a JSON/YAML config file (``{"tinybert": {"att_weight": 2}}``).
Layer indices are 0-based encoder layers; teacher/student "rep 0" (the embedding output) is its own term.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastkd.terms import LossTerm, kind_of


@dataclass
class Stage:
    name: str
    terms: list[LossTerm]
    epochs: int
    lr: float
    teacher: str = "finetuned"  # "pretrained" | "finetuned"
    data: str = "task"  # "task" | "general" | "augmented" (the task data and its augmented copies)
    augmented: bool = False  # the paper trains this stage on augmented task data (TinyBERT's augmentation)

    @property
    def needs_labels(self) -> bool:
        return any(kind_of(t).needs_labels for t in self.terms)

    @property
    def trains_head(self) -> bool:
        """Does this stage train the classifier (so dev accuracy means something)?"""
        return any(kind_of(t).trains_head for t in self.terms)


@dataclass
class Recipe:
    method: str
    stages: list[Stage]
    params: Any = None

    @property
    def needs_finetuned_teacher(self) -> bool:
        return any(s.teacher == "finetuned" for s in self.stages)


# ---------------------------------------------------------------- per-method parameters (paper defaults)


@dataclass
class KDParams:
    """Hinton KD: (1 − alpha)·CE + alpha·T²·soft CE."""

    alpha: float = 0.5
    temperature: float = 2.0
    epochs: int = 3
    lr: float = 5e-5


@dataclass
class TinyBERTParams:
    """TinyBERT task distillation: intermediate stage (emb + hidden + attention, uniform mapping), then the
    prediction stage (soft CE, T = 1, no T²). `layer_map` overrides the mapping: "s:t,s:t" (0-based)."""

    att_weight: float = 1.0
    hidden_weight: float = 1.0
    emb_weight: float = 1.0
    pred_weight: float = 1.0
    temperature: float = 1.0
    inter_epochs: int = 10
    pred_epochs: int = 3
    inter_lr: float = 5e-5
    pred_lr: float = 3e-5
    layer_map: str | None = None


@dataclass
class MiniLMParams:
    """MiniLM: attention KL + value-relation KL, teacher's last layer → student's last layer; in task mode a
    second stage fine-tunes the student on the labels (MiniLM is task-agnostic; its students are fine-tuned)."""

    att_weight: float = 1.0
    value_weight: float = 1.0
    teacher_layer: int = -1
    epochs: int = 5
    lr: float = 1e-4
    finetune_epochs: int = 3
    finetune_lr: float = 5e-5


@dataclass
class MiniLMv2Params:
    """MiniLMv2: Q-Q, K-K, V-V relations (1/3 each) of teacher layer `teacher_layer` and the student's last
    layer, re-split into `relation_heads` heads (None: 48 when it divides both widths, else the student's
    head count). Task mode adds a fine-tuning stage as for MiniLM."""

    relation_weight: float = 1.0
    teacher_layer: int = -1
    relation_heads: int | None = None
    epochs: int = 5
    lr: float = 1e-4
    finetune_epochs: int = 3
    finetune_lr: float = 5e-5


@dataclass
class PKDParams:
    """Patient KD: (1 − alpha)·CE + alpha·T²·KD + beta·PT; preset lr 1e-5, alpha 0.7, beta 500, T 10."""

    alpha: float = 0.7
    beta: float = 500.0
    temperature: float = 10.0
    epochs: int = 4
    lr: float = 1e-5
    layer_map: str | None = None
    # PKD's students are as wide as the teacher. For a narrower one, fastkd maps the student's [CLS] through the
    # learned projection W (TinyBERT's fit_dense; for an ETD student it starts as the kept-dimension selection)
    # before normalising. False keeps the paper's equal-width requirement.
    project_width: bool = True


@dataclass
class BertEMDParams:
    """BERT-EMD: beta·(theta·(L_att + L_hid) + L_emb) + kd_weight·T²·KD + ce_weight·CE, EMD over all layers,
    layer weights updated by cost attention after every step."""

    beta: float = 0.005
    theta: float = 1.0
    kd_weight: float = 0.8
    ce_weight: float = 0.2
    temperature: float = 1.0
    epochs: int = 4
    lr: float = 5e-5
    sinkhorn_eps: float | None = None
    sinkhorn_iters: int | None = None


@dataclass
class ERNIETinyParams:
    """ERNIE-Tiny's four stages; the latent loss is TinyBERT's (emb + hidden + attention, uniform mapping)."""

    att_weight: float = 1.0
    hidden_weight: float = 1.0
    emb_weight: float = 1.0
    soft_weight: float = 1.0
    hard_weight: float = 1.0
    temperature: float = 1.0
    general_epochs: int = 2
    enhanced_epochs: int = 2
    adaptive_epochs: int = 2
    specific_epochs: int = 3
    lr: float = 5e-5
    layer_map: str | None = None


def every_latent_stage(stages: list[Stage]) -> list[Stage]:
    """The default of --mode general: every stage that kept a task-agnostic term."""
    return stages


@dataclass(frozen=True)
class Method:
    """One distillation method: its settings (paper defaults), the prefixes --set accepts for them, the builder
    of its stages for given model shapes, and which of its stages --mode general runs (``general``: from the
    stages reduced to their task-agnostic terms, on the general corpus with the pretrained teacher)."""

    name: str
    params: type
    prefixes: tuple[str, ...]
    build: Callable[[Any, Shapes], list[Stage]]
    general: Callable[[list[Stage]], list[Stage]] = every_latent_stage


REGISTRY: dict[str, Method] = {}


def register_method(name: str, params: type, prefixes: tuple[str, ...] | None = None,
                    general: Callable[[list[Stage]], list[Stage]] = every_latent_stage):
    """Decorator: ``@register_method("pkd-skip", PKDParams, ("pkd", "pkd-skip", "pkd_skip"))`` registers the
    decorated ``build(params, shapes) -> stages`` as a method. ``prefixes``: what --set accepts for its settings
    (default: the name); the first is the one --help shows. ``general``: its --mode general stages (see
    :class:`Method`)."""
    def deco(build):
        if name in REGISTRY:
            raise ValueError(f"method: {name!r} is registered twice")
        REGISTRY[name] = Method(name, params, prefixes or (name,), build, general)
        return build

    return deco


def methods() -> tuple[str, ...]:
    """The registered methods' names, read at each call (a method registered later is included)."""
    return tuple(REGISTRY)


def method_entry(name: str) -> Method:
    return REGISTRY[check_method(name)]


@dataclass(frozen=True)
class Shapes:
    """What the recipe needs to know of the two models."""

    teacher_layers: int
    student_layers: int
    teacher_hidden: int
    student_hidden: int
    teacher_heads: int
    student_heads: int


class MappingError(ValueError):
    """The teacher and student can't be mapped by this recipe (the message says what to change)."""


def check_method(method: str) -> str:
    if method not in REGISTRY:
        raise ValueError(f"method: expected one of {', '.join(methods())}, got {method!r}")
    return method


# ---------------------------------------------------------------- overrides


def _coerce(value: Any, annotation: str, name: str) -> Any:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            pass  # a plain string, e.g. a layer map "0:1,1:3"
    if value is None:
        if "None" in annotation:
            return None
        raise ValueError(f"{name}: expected {annotation}, got null")
    if annotation.startswith("int") and not isinstance(value, bool):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, int):
            return value
    elif annotation.startswith("float") and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    elif annotation.startswith("str"):
        return str(value)
    elif annotation.startswith("bool") and isinstance(value, bool):
        return value
    raise ValueError(f"{name}: expected {annotation}, got {value!r}")


def setting_prefix(method: str) -> str:
    """The prefix of a method's settings in --set and config files (``pkd`` for both PKD variants)."""
    return REGISTRY[check_method(method)].prefixes[0]


def make_params(method: str, overrides: dict[str, Any] | None = None, *, max_epochs: int | None = None):
    """The method's parameter dataclass with ``overrides`` ({"tinybert.att_weight": 2} or nested
    {"tinybert": {"att_weight": 2}}) applied. Keys for other methods are ignored; unknown fields are errors.
    ``max_epochs``: a cap on the recipe's own epochs (the trainer's CPU profile); epochs set in ``overrides`` are
    the user's and kept."""
    cls = REGISTRY[check_method(method)].params
    params = cls()
    fields = {f.name: f for f in dataclasses.fields(cls)}
    flat: dict[str, Any] = {}
    given: set[str] = set()  # the fields the overrides set: the user's, which max_epochs leaves alone
    for key, value in (overrides or {}).items():
        if isinstance(value, dict):
            for sub, v in value.items():
                flat[f"{key}.{sub}"] = v
        else:
            flat[key] = value
    for key, value in flat.items():
        if "." not in key:
            raise ValueError(f"--set: expected <method>.<field>=<value> (e.g. tinybert.att_weight=2), got {key!r}")
        prefix, name = key.split(".", 1)
        if prefix not in REGISTRY[method].prefixes:
            known = {p for m in REGISTRY.values() for p in m.prefixes}
            if prefix not in known:
                raise ValueError(f"--set: unknown method prefix {prefix!r} in {key!r}; expected one of "
                                 f"{sorted(known)}")
            continue  # a setting for another method (a shared config file)
        if name not in fields:
            raise ValueError(f"--set: {method} has no setting {name!r}; expected one of {sorted(fields)}")
        setattr(params, name, _coerce(value, str(fields[name].type), key))
        given.add(name)
    if max_epochs is not None:
        for name in fields:
            if name.endswith("epochs") and name not in given:
                setattr(params, name, min(getattr(params, name), max_epochs))
    _check_ranges(method, params)
    return params


def _check_ranges(method: str, params) -> None:
    """Values no paper means (a negative lr or epoch count, alpha outside [0, 1], T = 0) fail here, naming the
    setting, before any model is loaded; the field's name says which rule applies."""
    prefix = setting_prefix(method)
    for f in dataclasses.fields(params):
        v, n = getattr(params, f.name), f.name
        if v is None or isinstance(v, (bool, str)):
            continue
        if n.endswith("epochs"):
            ok, expected = v >= 0, "an epoch count >= 0 (0 skips the stage)"
        elif n == "lr" or n.endswith("_lr") or n in ("temperature", "sinkhorn_eps"):
            ok, expected = math.isfinite(v) and v > 0, "a finite number > 0"
        elif n == "alpha":
            ok, expected = 0 <= v <= 1, "a number in [0, 1]"
        elif n in ("sinkhorn_iters", "relation_heads"):
            ok, expected = v >= 1, "a positive integer"
        elif n == "teacher_layer":
            continue  # negative counts from the end; checked against the teacher's depth when the recipe is built
        else:  # loss weights: 0 switches a term off
            ok, expected = math.isfinite(v) and v >= 0, "a finite number >= 0"
        if not ok:
            raise ValueError(f"--set {prefix}.{n}: expected {expected}, got {v!r}")


def load_config_file(path: str | Path) -> dict[str, Any]:
    """A JSON or YAML file of overrides: {"tinybert": {"att_weight": 2}} or {"tinybert.att_weight": 2}.
    A top-level "train" section holds trainer options (CLI flag names without dashes)."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"--config: no such file {str(p)!r}")
    try:
        text = p.read_text(encoding="utf-8")
        if p.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except UnicodeDecodeError as e:
        raise ValueError(f"--config: {p} is not UTF-8 text ({e.reason} at byte {e.start + 1})") from None
    except Exception as e:  # noqa: BLE001 - json's and yaml's errors: say which file and where
        kind = "YAML" if p.suffix.lower() in (".yaml", ".yml") else "JSON"
        raise ValueError(f"--config: {p} is not valid {kind} ({e}); fix the file, e.g. "
                         f'{{"tinybert": {{"att_weight": 2}}, "train": {{"epochs": 1}}}}') from None
    if not isinstance(data, dict):
        raise ValueError(f"--config: expected a mapping at the top of {p}, got {type(data).__name__}")
    return data


def parse_set(items: list[str]) -> dict[str, Any]:
    out = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--set: expected <method>.<field>=<value>, got {item!r}")
        k, v = item.split("=", 1)
        out[k.strip()] = v.strip()
    return out


# ---------------------------------------------------------------- layer mappings


def uniform_pairs(n_s: int, n_t: int) -> list[tuple[int, int]]:
    """TinyBERT's uniform mapping: student layer i ← teacher layer k·(i+1) − 1, k = n_t / n_s (rounded when
    n_t is not a multiple of n_s), so the last layers meet."""
    return [(i, max(0, round((i + 1) * n_t / n_s) - 1)) for i in range(n_s)]


def parse_layer_map(text: str, shapes: Shapes) -> list[tuple[int, int]]:
    pairs = []
    for part in str(text).split(","):
        try:
            s, t = (int(x) for x in part.split(":"))
        except ValueError:
            raise MappingError(
                f"layer_map: expected 'student:teacher,...' 0-based (e.g. '0:1,1:3'), got {text!r}") from None
        if not 0 <= s < shapes.student_layers:
            raise MappingError(f"layer_map: student layer {s} out of range 0..{shapes.student_layers - 1}")
        if not 0 <= t < shapes.teacher_layers:
            raise MappingError(f"layer_map: teacher layer {t} out of range 0..{shapes.teacher_layers - 1}")
        pairs.append((s, t))
    return pairs


def _resolve_layer(i: int, n: int, name: str) -> int:
    if not -n <= i < n:
        raise MappingError(f"{name}: layer {i} out of range for a teacher with {n} layers")
    return i % n


def _need_equal_heads(shapes: Shapes, method: str):
    if shapes.student_heads != shapes.teacher_heads:
        raise MappingError(
            f"{method}: attention losses compare per-head score maps, so student and teacher need the same head "
            f"count; the teacher has {shapes.teacher_heads} heads, the student {shapes.student_heads}. Set "
            f"--student-heads {shapes.teacher_heads}, or give a --student with {shapes.teacher_heads} heads (or use "
            f"--method minilmv2, whose relation heads may differ)"
        )


def _need_depth(shapes: Shapes, method: str):
    if shapes.student_layers > shapes.teacher_layers:
        raise MappingError(
            f"{method}: the student has {shapes.student_layers} layers but the teacher only "
            f"{shapes.teacher_layers}; set --student-layers to at most {shapes.teacher_layers}"
        )
    if shapes.student_hidden % shapes.student_heads:
        raise MappingError(f"student: hidden size {shapes.student_hidden} is not divisible by "
                           f"{shapes.student_heads} heads; change --student-hidden or --student-heads")


def _latent_terms(p, shapes: Shapes, method: str) -> list[LossTerm]:
    _need_equal_heads(shapes, method)
    pairs = parse_layer_map(p.layer_map, shapes) if p.layer_map else uniform_pairs(shapes.student_layers,
                                                                                      shapes.teacher_layers)
    return [LossTerm("emb_mse", p.emb_weight), LossTerm("hidden_mse", p.hidden_weight, pairs),
            LossTerm("att_mse", p.att_weight, pairs)]


def default_relation_heads(shapes: Shapes) -> int:
    """MiniLMv2's recommendation (48 relation heads for base-size teachers, 64 for large) when it divides both
    widths, else the student's head count, else the largest common divisor up to 64."""
    def fits(h):
        return shapes.student_hidden % h == 0 and shapes.teacher_hidden % h == 0

    for h in (48, 64, shapes.student_heads):
        if fits(h):
            return h
    return next(h for h in range(64, 0, -1) if fits(h))


# ---------------------------------------------------------------- recipes


@register_method("kd", KDParams)
def _kd(p: KDParams, shapes: Shapes) -> list[Stage]:
    return [Stage("kd", [LossTerm("soft_ce", p.alpha, temperature=p.temperature, times_t2=True),
                         LossTerm("hard_ce", 1.0 - p.alpha)], p.epochs, p.lr)]


@register_method("tinybert", TinyBERTParams)
def _tinybert(p: TinyBERTParams, shapes: Shapes) -> list[Stage]:
    # TinyBERT's intermediate stage runs on augmented data, its prediction stage on the original data.
    return [Stage("intermediate", _latent_terms(p, shapes, "tinybert"), p.inter_epochs, p.inter_lr, augmented=True),
            Stage("prediction", [LossTerm("soft_ce", p.pred_weight, temperature=p.temperature)],
                  p.pred_epochs, p.pred_lr)]


@register_method("minilm", MiniLMParams)
def _minilm(p: MiniLMParams, shapes: Shapes) -> list[Stage]:
    _need_equal_heads(shapes, "minilm")
    pair = [(shapes.student_layers - 1, _resolve_layer(p.teacher_layer, shapes.teacher_layers, "minilm.teacher_layer"))]
    return [Stage("distill", [LossTerm("att_kl", p.att_weight, pair), LossTerm("value_kl", p.value_weight, pair)],
                  p.epochs, p.lr),
            Stage("finetune", [LossTerm("hard_ce", 1.0)], p.finetune_epochs, p.finetune_lr)]


@register_method("minilmv2", MiniLMv2Params)
def _minilmv2(p: MiniLMv2Params, shapes: Shapes) -> list[Stage]:
    heads = p.relation_heads or default_relation_heads(shapes)
    for side, width in (("student", shapes.student_hidden), ("teacher", shapes.teacher_hidden)):
        if width % heads:
            raise MappingError(f"minilmv2: relation_heads={heads} must divide the {side} hidden size {width}; "
                               f"set --set minilmv2.relation_heads=<a divisor of both "
                               f"{shapes.student_hidden} and {shapes.teacher_hidden}>")
    pair = [(shapes.student_layers - 1,
             _resolve_layer(p.teacher_layer, shapes.teacher_layers, "minilmv2.teacher_layer"))]
    return [Stage("distill", [LossTerm("qkv_relation", p.relation_weight, pair, relation_heads=heads)],
                  p.epochs, p.lr),
            Stage("finetune", [LossTerm("hard_ce", 1.0)], p.finetune_epochs, p.finetune_lr)]


def _pkd(method: str):
    def build(p: PKDParams, shapes: Shapes) -> list[Stage]:
        n_s, n_t = shapes.student_layers, shapes.teacher_layers
        if shapes.student_hidden != shapes.teacher_hidden and not p.project_width:
            raise MappingError(f"{method}: the patience loss compares normalised [CLS] vectors, so widths must "
                               f"match; the teacher's hidden size is {shapes.teacher_hidden}, the student's "
                               f"{shapes.student_hidden}. Set --student-hidden {shapes.teacher_hidden} or "
                               f"--set pkd.project_width=true (a learned projection of the student's [CLS])")
        if p.layer_map:
            pairs = parse_layer_map(p.layer_map, shapes)
        elif method == "pkd-skip":
            pairs = [(i, t) for i, t in uniform_pairs(n_s, n_t)][:-1]  # the last layer is covered by KD
        else:
            pairs = [(i, n_t - n_s + i) for i in range(n_s - 1)]
        terms = [LossTerm("soft_ce", p.alpha, temperature=p.temperature, times_t2=True),
                 LossTerm("hard_ce", 1.0 - p.alpha)]
        if pairs:
            # PKD's code takes F.mse_loss over the stacked normalised [CLS] vectors, i.e. the mean over layers,
            # batch and features; losses.pkd_mse sums over features and layers, so β is divided by K·d to keep
            # the paper's β = 500 meaning what it meant there (d: the compared width, the teacher's).
            terms.append(LossTerm("pkd", p.beta / (len(pairs) * shapes.teacher_hidden), pairs))
        return [Stage("pkd", terms, p.epochs, p.lr)]

    return build


register_method("pkd-last", PKDParams, ("pkd", "pkd-last", "pkd_last"))(_pkd("pkd-last"))
register_method("pkd-skip", PKDParams, ("pkd", "pkd-skip", "pkd_skip"))(_pkd("pkd-skip"))


@register_method("bert-emd", BertEMDParams, ("bert-emd", "bert_emd", "emd"))
def _bert_emd(p: BertEMDParams, shapes: Shapes) -> list[Stage]:
    _need_equal_heads(shapes, "bert-emd")
    return [Stage("emd", [LossTerm("emb_mse", p.beta), LossTerm("emd_att", p.beta * p.theta),
                          LossTerm("emd_hidden", p.beta * p.theta),
                          LossTerm("soft_ce", p.kd_weight, temperature=p.temperature, times_t2=True),
                          LossTerm("hard_ce", p.ce_weight)], p.epochs, p.lr, augmented=True)]  # --aug_train


def _first_stage(stages: list[Stage]) -> list[Stage]:
    """ERNIE-Tiny's stages 1-3 collapse to one general stage without a fine-tuned teacher."""
    return stages[:1]


@register_method("ernie-tiny", ERNIETinyParams, ("ernie-tiny", "ernie_tiny", "ernie"), general=_first_stage)
def _ernie_tiny(p: ERNIETinyParams, shapes: Shapes) -> list[Stage]:
    latent = _latent_terms(p, shapes, "ernie-tiny")
    return [Stage("general", latent, p.general_epochs, p.lr, teacher="pretrained", data="general"),
            Stage("general-enhanced", latent, p.enhanced_epochs, p.lr, teacher="finetuned", data="general"),
            Stage("task-adaptive", latent, p.adaptive_epochs, p.lr, teacher="finetuned", data="task"),
            Stage("task-specific", latent + [LossTerm("soft_ce", p.soft_weight, temperature=p.temperature),
                                             LossTerm("hard_ce", p.hard_weight)],
                  p.specific_epochs, p.lr, teacher="finetuned", data="task")]


def _general_stages(method: str, stages: list[Stage]) -> list[Stage]:
    """--mode general: the stages reduced to their task-agnostic (latent) terms, on the general corpus with the
    pretrained teacher, then the method's own choice among them (its registration's ``general``)."""
    general = []
    for s in stages:
        terms = [t for t in s.terms if kind_of(t).latent]
        if terms:
            general.append(dataclasses.replace(s, terms=terms, teacher="pretrained", data="general"))
    if not general:
        usable = [m for m in methods() if _has_latent_terms(m)]
        raise ValueError(f"mode: {method} has no task-agnostic (intermediate-layer) loss, so it can't run "
                         f"with --mode general; use one of {', '.join(usable)}")
    return REGISTRY[method].general(general)


def _has_latent_terms(method: str) -> bool:
    shapes = Shapes(4, 2, 8, 8, 2, 2)  # any valid pair: the question is which kinds the method uses
    try:
        stages = REGISTRY[method].build(make_params(method), shapes)
    except ValueError:
        return False
    return any(kind_of(t).latent for s in stages for t in s.terms)


AUGMENT_CHOICES = ("off", "on", "all-stages")


def _augment_stages(method: str, stages: list[Stage], augment: str) -> list[Stage]:
    """``augment`` "on": the stages whose paper trains on augmented data read it; "all-stages": every task stage."""
    if augment not in AUGMENT_CHOICES:
        raise ValueError(f"augment: expected one of {', '.join(AUGMENT_CHOICES)}, got {augment!r}")
    if augment == "off":
        return stages
    picked = [s.data == "task" and (s.augmented or augment == "all-stages") for s in stages]
    if not any(picked):
        raise ValueError(f"augment: no stage of {method} reads augmented data with --augment {augment} (its paper "
                         f"trains on the original data; TinyBERT's intermediate stage and BERT-EMD do augment); "
                         f"use --augment all-stages to augment every task stage, or leave it off")
    return [dataclasses.replace(s, data="augmented") if pick else s for s, pick in zip(stages, picked, strict=True)]


def build_recipe(method: str, shapes: Shapes, params=None, *, mode: str = "task", epochs: int | None = None,
                 augment: str = "off") -> Recipe:
    """The method's stages for these model shapes. ``mode='general'`` keeps only the task-agnostic
    (latent-loss) stages, on the general corpus with the pretrained teacher. ``epochs``: every stage's (else
    ``params``', which :func:`make_params` caps on a CPU). ``augment``: which task stages read augmented data (see
    :data:`AUGMENT_CHOICES`)."""
    check_method(method)
    if mode not in ("task", "general"):
        raise ValueError(f"mode: expected 'task' or 'general', got {mode!r}")
    p = params if params is not None else make_params(method)
    _need_depth(shapes, method)
    stages = REGISTRY[method].build(p, shapes)
    if mode == "general":
        stages = _general_stages(method, stages)
    stages = _augment_stages(method, stages, augment)
    for s in stages:
        s.terms = [t for t in s.terms if t.weight != 0.0]  # a zero weight switches a term off
        if epochs is not None:
            s.epochs = epochs
        if not s.terms:
            raise ValueError(f"{method}: every loss weight of stage {s.name!r} is 0; nothing to train")
    return Recipe(method, stages, p)


def describe(recipe: Recipe) -> str:
    lines = [f"method {recipe.method}: {len(recipe.stages)} stage(s)"]
    for i, s in enumerate(recipe.stages, 1):
        terms = ", ".join(f"{t.kind}×{t.weight:g}" + (f" {t.pairs}" if t.pairs else "") for t in s.terms)
        lines.append(f"  {i}. {s.name}: {s.epochs} epoch(s), lr {s.lr:g}, {s.teacher} teacher, {s.data} data; "
                     f"{terms}")
    return "\n".join(lines)
