"""fastkd's lean distillation trainer: ``python -m fastkd.train --method tinybert --etd impt``.

One engine runs every method in :mod:`fastkd.recipes`: a frozen teacher (eval mode, inference mode, SDPA,
fp16/bf16 on CUDA) whose activations are captured with hooks (only what the recipe reads) or read from a
:class:`fastkd.cache.TeacherCache`; a student trained with AMP, AdamW (fused on CUDA), warm-up + linear decay,
gradient clipping and accumulation on length-bucketed, dynamically padded batches; dev evaluation with best-
checkpoint selection; JSONL metrics and a loss-curve PNG; resumable checkpoints (``--resume`` after kill -9
ends with the same weights as an uninterrupted run); DDP under ``torchrun``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import random
import re
import sys
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fastkd import losses
from fastkd.batching import LengthBucketSampler, collate, make_loader
from fastkd.cache import TeacherCache, fingerprint_dataset, fingerprint_tokenizer
from fastkd.capture import ActivationCapture
from fastkd.checks import value_checks
from fastkd.data import LABEL_COLUMNS, TASKS, TEXT_COLUMNS, load_texts, tokenize
from fastkd.device_cache import DeviceCache
from fastkd.emd import update_layer_weights
from fastkd.recipes import (
    METHODS,
    PARAMS,
    LossTerm,
    MappingError,
    Recipe,
    Shapes,
    Stage,
    build_recipe,
    capture_plan,
    describe,
    load_config_file,
    make_params,
    parse_set,
    setting_prefix,
)

CPU_TRAIN_EXAMPLES = 3000  # the CPU default subset (full data on a GPU): ~1.5 min idle, < 10 min on a busy 2-core box
CPU_DEV_EXAMPLES = 500
CPU_MAX_EPOCHS = 1
_STEP_DELAY = float(os.environ.get("FASTKD_STEP_DELAY", "0") or 0)  # seconds after each step (tests only)


class NonFiniteLossError(FloatingPointError):
    pass


# ---------------------------------------------------------------- batches


def batches_for_epoch(sampler: LengthBucketSampler, dataset, pad_token_id: int, *, num_workers: int = 0,
                      pin_memory: bool = False):
    """Collated, dynamically padded batches for the sampler's current epoch (from its resume point).

    Creating a DataLoader iterator draws a seed from the global torch RNG; that draw is undone so an epoch
    resumed mid-way sees the same dropout masks as an uninterrupted run (the RNG state is checkpointed)."""
    rng = torch.get_rng_state()
    it = iter(make_loader(dataset, sampler, pad_token_id, num_workers=num_workers, pin_memory=pin_memory))
    torch.set_rng_state(rng)
    return it


def lr_lambda(total_steps: int, warmup_steps: int):
    def f(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return f


# ---------------------------------------------------------------- configuration


# The options that take one of a few words (the CLI's choices; TrainConfig checks them too).
_CHOICES = {
    "method": METHODS,
    "mode": ("task", "general"),
    "etd": ("impt", "rand", "none"),
    "teacher_dtype": ("auto", "fp32", "fp16", "bf16"),
    "amp": ("auto", "bf16", "fp16", "off"),
    "cache": ("auto", "off", "memory", "disk", "device"),
}


@dataclass
class TrainConfig:
    method: str = "tinybert"
    mode: str = "task"  # "task" | "general"
    task: str = "sst2"  # a task name (fastkd.data.TASKS) or a path to a labelled .tsv/.csv/.json(l) file
    dev: str | None = None  # dev data (task name or path); default: the task's dev split
    test: str | None = None  # test data; default: the task's test split
    general_corpus: str | None = None  # unlabelled text (--mode general: the task's; ERNIE-Tiny: agnews)
    text_column: str | None = None  # a data file's text column when its name is not one fastkd tries
    label_column: str | None = None  # a data file's label column, likewise
    text_pair_column: str | None = None  # the second text of sentence pairs (found by name when not given)
    teacher: str | None = None  # a local model folder; default the packaged MiniLM
    output_dir: str | None = None
    etd: str = "none"  # "impt" | "rand" | "none" (none: random initialisation)
    student_layers: int = 3
    student_hidden: int = 384
    student_heads: int = 12
    student_ffn: int = 1536
    batch_size: int = 32
    grad_accum: int = 1
    max_length: int = 128
    warmup: float = 0.1
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    epochs: int | None = None  # overrides every stage's epochs
    max_train_examples: int | None = None  # default: all on a GPU, CPU_TRAIN_EXAMPLES on a CPU; 0: all
    max_dev_examples: int | None = None  # default: all on a GPU, CPU_DEV_EXAMPLES on a CPU; 0: all
    teacher_dtype: str = "auto"  # auto (fp16 on CUDA, fp32 on CPU) | fp32 | fp16 | bf16
    amp: str = "auto"  # auto (bf16 if supported, else fp16 + GradScaler on CUDA; off on CPU) | bf16 | fp16 | off
    cache: str = "auto"  # auto (device on a GPU when it fits, else memory) | off | memory | disk | device
    cache_dir: str | None = None
    finetune_epochs: int | None = None  # teacher fine-tuning epochs (default 3 on a GPU, 1 on a CPU)
    # Training examples for the teacher's fine-tune: None = the student's training data (the CPU subset on a
    # CPU), 0 = all of the task's training data, N = a seeded N-example subset. The fine-tune is cached, so a
    # stronger teacher costs once per (teacher, data, settings).
    finetune_examples: int | None = None
    # Seed of the teacher's fine-tune (default: --seed). Fixing it lets runs with different --seed share one
    # cached teacher, so a seed sweep measures the student's variance, not the teacher's.
    finetune_seed: int | None = None
    save_every: int = 0  # checkpoint every N optimizer steps (0: only at epoch ends)
    keep_checkpoints: int = 2
    resume: bool = False
    seed: int = 0
    log_every: int = 10
    latency_runs: int = 20
    progress: bool = True
    overrides: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        # Checked here, not only by the CLI, so a config built in code is held to the same rules.
        def bad(name: str, expected: str):
            raise ValueError(f"--{name.replace('_', '-')}: expected {expected}, got {getattr(self, name)!r}")

        for name, choices in _CHOICES.items():
            if getattr(self, name) not in choices:
                bad(name, f"one of {', '.join(choices)}")
        for name in ("batch_size", "grad_accum", "max_length", "student_layers", "student_hidden", "student_heads",
                     "student_ffn", "keep_checkpoints", "log_every", "latency_runs", "epochs", "finetune_epochs"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                bad(name, "a positive integer")
        for name in ("save_every", "seed", "finetune_seed"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                bad(name, "0 or a positive integer")
        for name in ("max_train_examples", "max_dev_examples", "finetune_examples"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                bad(name, "0 (all the data) or a positive count")
        if not 0 <= self.warmup <= 1:
            bad("warmup", "a fraction of the steps in [0, 1]")
        for name in ("weight_decay", "max_grad_norm"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
                bad(name, "a finite number >= 0")


# One line of help per trainer option (the dataclass comments above say why; these say what).
_HELP = {
    "method": f"one of {', '.join(METHODS)}",
    "mode": "task: distil on a labelled task (the student gets a classifier head); general: task-agnostic "
            "distillation on unlabelled text (a general student, to fine-tune later)",
    "task": f"task name ({', '.join(TASKS)}; read from FASTKD_DATA_DIR, else the hub) or a labelled "
            ".tsv/.csv/.json(l) file with text (or sentence-pair) and label columns",
    "dev": "dev data for evaluation and best-checkpoint selection: task name or file (default: the task's own dev "
           "split, a task name's or a folder's dev file; else a fixed held-out slice of train, as for AG News)",
    "test": "test data for the final report: task name or file (default: the task's own test split, a task "
            "name's or a folder's test file; a single file has none)",
    "general_corpus": "unlabelled text: a task name or a file (default: --task in general mode, agnews for "
                      "ERNIE-Tiny's general stages)",
    "text_column": "the text column of data files whose header names it otherwise (default: the first of "
                   f"{', '.join(TEXT_COLUMNS)}, else the first text column)",
    "label_column": "the label column of data files whose header names it otherwise (default: the first of "
                    f"{', '.join(LABEL_COLUMNS)})",
    "text_pair_column": "the second text of sentence-pair data files (default: found by name: sentence1/sentence2, "
                        "question1/question2, premise/hypothesis, question/sentence, text_a/text_b)",
    "teacher": "local model folder, with or without a task head (default: the packaged MiniLM); a teacher without "
               "a head is fine-tuned first and cached",
    "output_dir": "where the run writes checkpoints, metrics.jsonl, loss.png and the student (default: "
                  "runs/<method>-<task>-<time>)",
    "etd": "student initialisation: extract the teacher's weights by importance (impt) or at random (rand), or "
           "none (random initialisation)",
    "student_layers": "student depth", "student_hidden": "student width",
    "student_heads": "student attention heads", "student_ffn": "student FFN width",
    "batch_size": "examples per micro-batch", "grad_accum": "micro-batches per optimizer step",
    "max_length": "tokens per example at most (batches are padded to their longest example only)",
    "save_every": "checkpoint every N optimizer steps (0: only at each epoch's end)",
    "keep_checkpoints": "checkpoints kept on disk (the newest)",
    "seed": "seed of data order, dropout and ETD-Rand",
    "log_every": "optimizer steps between metrics.jsonl lines",
    "latency_runs": "timed batch-1 forward passes per model for the final CPU speed-up (the median is reported)",
    "warmup": "fraction of each stage's steps spent in linear warm-up", "weight_decay": "AdamW weight decay",
    "max_grad_norm": "gradient clipping norm (0: off)",
    "epochs": "epochs of every stage (default: each recipe's own; 1 on a CPU)",
    "max_train_examples": "training examples, a seeded subset (0: all; default: all on a GPU, "
                          f"{CPU_TRAIN_EXAMPLES} on a CPU)",
    "max_dev_examples": f"dev examples (0: all; default: all on a GPU, {CPU_DEV_EXAMPLES} on a CPU)",
    "finetune_epochs": "epochs of the teacher's fine-tune, when it has no task head (default: 3 on a GPU, 1 on a "
                       "CPU)",
    "finetune_examples": "teacher fine-tune data: 0 = all training examples (default: the student's data)",
    "finetune_seed": "seed of the teacher's fine-tune (default: --seed)",
    "teacher_dtype": "precision of the frozen teacher (auto: fp16 on CUDA, fp32 on a CPU)",
    "amp": "student autocast (auto: bf16 where supported, else fp16 with loss scaling, on CUDA; off on a CPU)",
    "cache": "teacher activations: host memory, disk shards (reused by later runs), or accelerator memory "
             "(device: one gather per field and batch); auto = device on a single GPU when the dataset's "
             "activations fit half its free memory, else memory",
    "cache_dir": "fastkd's cache: the disk cache's shards (activations/) and the fine-tuned teachers (teachers/) "
                 "(default: $FASTKD_CACHE_DIR, else ~/.cache/fastkd)",
    "resume": "continue the run in --output-dir from its last checkpoint",
    "progress": "no progress bar",
    "set": "override a recipe setting, e.g. tinybert.att_weight=2 (repeatable; the settings are listed below)",
    "config": "JSON/YAML file of recipe overrides (+ a 'train' section of the options above)",
}


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the epilog's lines; adds "(default: X)" only where the help does not already say the default."""

    def _get_help_string(self, action):
        help = action.help or ""
        if "default" in help or any(action.default is v for v in (None, False, True, argparse.SUPPRESS)) \
                or action.default == []:
            return help
        return super()._get_help_string(action)


def recipe_settings_help() -> str:
    """Every method's recipe settings with their defaults, for --help (what --set and --config accept)."""
    lines = ["recipe settings (--set METHOD.FIELD=VALUE or --config; defaults follow each paper):"]
    seen: set[type] = set()
    for method in METHODS:
        cls = PARAMS[method]
        if cls in seen:
            continue
        seen.add(cls)
        names = [m for m in METHODS if PARAMS[m] is cls]
        prefix = setting_prefix(method)
        defaults = cls()
        fields = ", ".join(f"{f.name}={getattr(defaults, f.name)}" for f in dataclasses.fields(cls))
        lines.append(textwrap.fill(fields, 100, initial_indent=f"  {'/'.join(names)} ({prefix}.FIELD): ",
                                   subsequent_indent="      "))
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    d = TrainConfig()
    p = argparse.ArgumentParser(prog="python -m fastkd.train", description=__doc__.split("\n\n")[0],
                                formatter_class=_HelpFormatter, epilog=recipe_settings_help())

    def opt(name: str, **kw):
        p.add_argument("--" + name.replace("_", "-"), help=_HELP[name], **kw)

    opt("method", default=d.method)
    opt("mode", default=d.mode, choices=_CHOICES["mode"])
    for name in ("task", "dev", "test", "general_corpus", "text_column", "label_column", "text_pair_column",
                 "teacher", "output_dir"):
        opt(name, default=getattr(d, name))
    opt("etd", default=d.etd, choices=_CHOICES["etd"])
    for name in ("student_layers", "student_hidden", "student_heads", "student_ffn", "batch_size", "grad_accum",
                 "max_length", "save_every", "keep_checkpoints", "seed", "log_every", "latency_runs"):
        opt(name, type=int, default=getattr(d, name))
    for name in ("warmup", "weight_decay", "max_grad_norm"):
        opt(name, type=float, default=getattr(d, name))
    for name in ("epochs", "max_train_examples", "max_dev_examples", "finetune_epochs", "finetune_examples",
                 "finetune_seed"):
        opt(name, type=int, default=None)
    opt("teacher_dtype", default=d.teacher_dtype, choices=_CHOICES["teacher_dtype"])
    opt("amp", default=d.amp, choices=_CHOICES["amp"])
    opt("cache", default=d.cache, choices=_CHOICES["cache"])
    opt("cache_dir", default=None)
    opt("resume", action="store_true")
    p.add_argument("--no-progress", dest="progress", action="store_false", help=_HELP["progress"])
    opt("set", action="append", default=[], metavar="METHOD.FIELD=VALUE")
    opt("config", default=None)
    return p


def parse_config(argv: list[str] | None = None) -> TrainConfig:
    args = build_parser().parse_args(argv)
    overrides: dict[str, Any] = {}
    values = vars(args)
    if args.config:
        data = load_config_file(args.config)
        train_section = data.pop("train", {}) or {}
        defaults = vars(build_parser().parse_args([]))
        for k, v in train_section.items():
            k = k.replace("-", "_")
            if k not in defaults:
                raise ValueError(f"--config: unknown train option {k!r}")
            if values[k] == defaults[k]:  # the command line wins over the file
                values[k] = v
        overrides.update(data)
    overrides.update(parse_set(values.pop("set")))
    values.pop("config")
    cfg = TrainConfig(**values, overrides=overrides)
    return cfg


# ---------------------------------------------------------------- distributed helpers


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed() -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    import torch.distributed as dist

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend)
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
    return Dist(dist.get_rank(), world, local)


# ---------------------------------------------------------------- models


def _has_task_head(config) -> bool:
    return any(a.endswith("ForSequenceClassification") for a in (config.architectures or []))


def student_config(teacher_config, cfg: TrainConfig):
    sc = type(teacher_config).from_dict(teacher_config.to_dict())
    sc.num_hidden_layers, sc.hidden_size = cfg.student_layers, cfg.student_hidden
    sc.num_attention_heads, sc.intermediate_size = cfg.student_heads, cfg.student_ffn
    return sc


def etd_batches(dataset, batch_size: int, pad_token_id: int, seed: int):
    """Labelled (when known) batches as dicts for fastkd.etd's importance pass."""
    sampler = LengthBucketSampler(dataset["length"], batch_size, seed=seed, shuffle=True)
    for b in batches_for_epoch(sampler, dataset, pad_token_id):
        d = b.model_inputs()
        if b.labels is not None:
            d["labels"] = b.labels
        yield d


def mapped_teacher_layers(recipe: Recipe, n_s: int, n_t: int) -> list[int] | None:
    """The teacher layers a recipe maps student layers 0..n_s-1 onto (TinyBERT/ERNIE-Tiny's uniform mapping),
    so ETD extracts each student layer from the teacher layer it will be distilled against; None when no
    term maps every student layer."""
    for stage in recipe.stages:
        for term in stage.terms:
            students = sorted(i for i, _ in term.pairs)
            if term.kind in ("hidden_mse", "att_mse") and students == list(range(n_s)):
                return [t for _, t in sorted(term.pairs)]
            if term.kind == "pkd" and students == list(range(n_s - 1)):
                # PKD maps all but the last student layer; the last one is distilled through the logits, so it
                # comes from the teacher's last layer.
                return [t for _, t in sorted(term.pairs)] + [n_t - 1]
    return None


def make_student(teacher: nn.Module, cfg: TrainConfig, data=None, log=print, num_batches: int = 64,
                 layers: list[int] | None = None) -> tuple[nn.Module, torch.Tensor | None]:
    """(student, kept teacher hidden dims or None): ETD extraction (``--etd impt|rand``, fastkd.etd) or, with
    ``--etd none``, the teacher's class randomly initialised."""
    torch.manual_seed(cfg.seed)
    if cfg.etd != "none":
        from fastkd.etd import extract_student

        log(f"student: extracting with ETD ({cfg.etd}) from the teacher"
            + (f" (importance over {num_batches} batches)" if cfg.etd == "impt" else "")
            + (f", teacher layers {layers} (the recipe's layer mapping)" if layers else ", uniform depth"))
        student, plan = extract_student(teacher, num_layers=cfg.student_layers, hidden_size=cfg.student_hidden,
                                        num_heads=cfg.student_heads, intermediate_size=cfg.student_ffn,
                                        strategy=cfg.etd, data=data, seed=cfg.seed, num_batches=num_batches,
                                        layers=layers, return_plan=True)
        return student, plan.hidden
    # --etd none is plain random initialisation: the baseline ETD's savings are measured against.
    # (PKD's "first k teacher layers" init is what --etd rand gives at the teacher's own width.)
    log("student: --etd none: random initialisation")
    return type(teacher)(student_config(teacher.config, cfg)), None


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


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


@contextlib.contextmanager
def capture_fields(model: nn.Module, fields: list[str]):
    """Hooks recording ``fields`` (cache naming) on ``model``; yields a function returning them."""
    hidden = [int(f.split(".")[1]) for f in fields if f.startswith("hidden.")]
    qkv: dict[int, str] = {}
    for f in fields:
        c, _, i = f.partition(".")
        if c in "qkv" and i:
            qkv[int(i)] = qkv.get(int(i), "") + c
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


class TeacherRunner:
    """Teacher activations for a batch: from the cache when every example is there, else a live forward in
    inference mode (and stored). Counts live forwards (``calls``) so tests can prove the cache is used."""

    def __init__(self, teacher: nn.Module, fields: list[str], cache, device):
        self.teacher, self.fields, self.cache, self.device = teacher, fields, cache, device
        self.calls = 0

    def __call__(self, batch, host=None) -> dict[str, torch.Tensor]:
        """``host``: the batch's CPU copy, so cache look-ups cost no device-to-host sync."""
        if not self.fields:  # the stage's losses need nothing from the teacher: no forward at all
            return {}
        host = batch if host is None else host
        lengths = host.attention_mask.sum(1).cpu()
        if self.cache is not None:
            got = self.cache.get(host.index, lengths)
            if got is not None:
                return {k: v.to(self.device, non_blocking=True) for k, v in got.items()}
        self.calls += 1
        with torch.inference_mode(), capture_fields(self.teacher, self.fields) as read:
            out = read(self.teacher(**batch.model_inputs()))
        if self.cache is not None:
            self.cache.put(host.index, lengths, out, {k: seq_dim(k) for k in out})
        return out


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


# ---------------------------------------------------------------- evaluation and latency


@torch.no_grad()
def evaluate(model: nn.Module, dataset, batch_size: int, device, pad_token_id: int) -> float:
    """Accuracy of a sequence-classification model on a tokenised, labelled dataset."""
    was_training = model.training
    model.eval()
    lengths = list(dataset["length"])
    order = sorted(range(len(dataset)), key=lambda i: lengths[i])
    correct = 0
    for c in range(0, len(order), batch_size):
        idx = order[c:c + batch_size]
        rows = dataset[idx]
        starts = rows.get("type_start") or [None] * len(idx)
        batch = collate([{"index": i, "input_ids": rows["input_ids"][j], "label": rows["label"][j],
                          "type_start": starts[j]} for j, i in enumerate(idx)], pad_token_id).to(device)
        logits = model(**batch.model_inputs()).logits
        correct += int((logits.argmax(-1) == batch.labels).sum())
    model.train(was_training)
    return correct / max(1, len(order))


@torch.no_grad()
def cpu_latency_ms(model: nn.Module, input_ids: list[int], runs: int = 20) -> float:
    """Median batch-1 CPU latency (ms) of ``model`` on one sequence, fp32, after warm-up."""
    m = model.to("cpu").float().eval()
    x = torch.tensor([input_ids])
    mask = torch.ones_like(x)
    for _ in range(3):
        m(input_ids=x, attention_mask=mask)
    times = []
    for _ in range(max(1, runs)):
        t0 = time.perf_counter()
        m(input_ids=x, attention_mask=mask)
        times.append(time.perf_counter() - t0)
    return 1000 * float(np.median(times))


# ---------------------------------------------------------------- checkpoints


def _rng_state() -> dict:
    st = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _set_rng_state(st: dict):
    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def _atomic_save(obj, path: Path):
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def latest_checkpoint(out_dir: Path) -> Path | None:
    ckpts = sorted((out_dir / "checkpoints").glob("step-*.pt"), key=lambda p: int(p.stem.split("-")[1]))
    return ckpts[-1] if ckpts else None


# ---------------------------------------------------------------- the trainer


RUN_FILE = "run.json"
# Config fields that must match for --resume to continue a run (the rest, e.g. --save-every, may change).
_IDENTITY = ("method", "mode", "task", "text_column", "label_column", "text_pair_column", "teacher", "etd",
             "student_layers", "student_hidden", "student_heads", "student_ffn", "batch_size", "grad_accum", "seed",
             "epochs", "max_train_examples", "overrides", "finetune_epochs", "finetune_examples", "finetune_seed")


class Trainer:
    def __init__(self, cfg: TrainConfig, log=None):
        self.cfg = cfg
        self.dist = init_distributed()
        self.device = torch.device(f"cuda:{self.dist.local_rank}" if torch.cuda.is_available() else "cpu")
        self.on_cpu = self.device.type == "cpu"
        self._log = log or print
        self.metrics_file = None
        self.teacher_calls = 0
        self.cache_stats: list[dict] = []
        self.last_ckpt: Path | None = None

    def log(self, msg: str):
        if self.dist.main:
            self._log(msg)

    # ------------------------------------------------------------ setup (all checks before any training)

    def _dtype(self) -> torch.dtype:
        name = self.cfg.teacher_dtype
        if name == "auto":
            return torch.float32 if self.on_cpu else torch.float16
        return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]

    def _amp(self):
        a = self.cfg.amp
        if a == "off" or (a == "auto" and self.on_cpu):
            return None
        if a == "auto":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return {"bf16": torch.bfloat16, "fp16": torch.float16}[a]

    def _prepare_output(self):
        cfg = self.cfg
        if cfg.output_dir is None:
            cfg.output_dir = str(Path("runs") / f"{cfg.method}-{Path(cfg.task).stem}-{time.strftime('%Y%m%d-%H%M%S')}")
        out = Path(cfg.output_dir)
        run_file = out / RUN_FILE
        mine = {k: getattr(cfg, k) for k in _IDENTITY}
        if not self.dist.main:  # rank 0 checks (and then writes) the folder
            return out, mine
        if cfg.resume and not run_file.is_file() and not (out.exists() and any(out.iterdir())):
            self.log(f"resume: {out} holds no run yet (killed before its first checkpoint?); starting it")
            cfg.resume = False
        if cfg.resume:
            if not run_file.is_file():
                raise ValueError(f"--resume: {out} holds files but no run to resume (no {RUN_FILE}); choose the "
                                 f"run's own --output-dir")
            saved = json.loads(run_file.read_text())["identity"]
            diff = {k: (saved.get(k), v) for k, v in json.loads(json.dumps(mine)).items() if saved.get(k) != v}
            if diff:
                raise ValueError(f"--resume: {out} holds a different run; settings differ: "
                                 + ", ".join(f"{k} (saved {a!r}, now {b!r})" for k, (a, b) in diff.items()))
        elif out.exists() and any(out.iterdir()):
            what = "another run" if run_file.is_file() else "other files"
            if run_file.is_file():
                saved = json.loads(run_file.read_text())
                what = f"another run (method {saved['identity'].get('method')}, started {saved.get('started')})"
            raise ValueError(f"--output-dir: {out} already holds {what}; pass --resume to continue it or choose "
                             f"an empty/new --output-dir")
        return out, mine

    def _load_texts(self, source: str, split: str, *, general: bool = False):
        """``source``'s split; --text-column / --label-column / --text-pair-column name a data file's columns (a
        general corpus is read as single texts without labels, so it is asked for the text column only)."""
        return load_texts(source, split, text_column=self.cfg.text_column,
                          label_column=None if general else self.cfg.label_column,
                          text_pair_column=None if general else self.cfg.text_pair_column)

    def _load_task_data(self, tokenizer):
        """Train, dev and test data: --dev/--test when given, else the task's own splits (a task name's, or a
        folder's <split> files); with no dev split a fixed slice of train is held out for model selection, so the
        test split stays unseen."""
        from fastkd.data import DataNotFoundError, has_splits

        cfg = self.cfg
        splits = has_splits(cfg.task)
        train = self._load_texts(cfg.task, "train")
        if "label" not in train.column_names:
            raise ValueError(f"--task: {cfg.task} has no labels; task mode needs labelled data "
                             f"(use --mode general for unlabelled text)")
        dev = test = None
        if cfg.dev:
            dev = self._load_texts(cfg.dev, "dev")
        elif splits:
            with contextlib.suppress(DataNotFoundError):  # AG News ships train/test only
                dev = self._load_texts(cfg.task, "dev")
        if dev is None and len(train) >= 2:
            held = train.train_test_split(test_size=max(1, min(1000, len(train) // 10)), seed=0)
            train, dev = held["train"], held["test"]
            self.log(f"data: no dev split for {cfg.task} (pass --dev to name one); holding out {len(dev)} train "
                     f"examples as dev")
        if cfg.test:
            test = self._load_texts(cfg.test, "test")
        elif cfg.task in TASKS:
            test = self._load_texts(cfg.task, "test")  # a named task's test split must exist
        elif splits:
            try:
                test = self._load_texts(cfg.task, "test")
            except DataNotFoundError:
                self.log(f"data: no test split in {cfg.task} (pass --test to name one); the report gives no test "
                         f"accuracy")
        from fastkd.data import label_names

        names = list(TASKS[cfg.task].labels) if cfg.task in TASKS else label_names(train)
        n_labels = len(names) if names else int(max(train["label"])) + 1
        names = names or [str(i) for i in range(n_labels)]
        for split_name, ds in (("train", train), ("dev", dev), ("test", test)):
            if ds is not None and "label" in ds.column_names and len(ds):
                lo, hi = min(ds["label"]), max(ds["label"])
                if lo < 0 or hi >= n_labels:
                    raise ValueError(f"data: {split_name} labels span {lo}..{hi}, expected 0..{n_labels - 1} "
                                     f"({names})")
        return train, dev, test, names

    @property
    def finetune_seed(self) -> int:
        return self.cfg.seed if self.cfg.finetune_seed is None else self.cfg.finetune_seed

    def _subset(self, ds, n: int | None, seed: int):
        if n is None or n >= len(ds):
            return ds
        return ds.shuffle(seed=seed).select(range(n))

    def setup(self):
        from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification, AutoTokenizer

        from fastkd.finetune import FinetuneConfig, data_digest, finetune_teacher, model_digest
        from fastkd.models import resolve_model_path

        cfg = self.cfg
        self.out_dir, identity = self._prepare_output()
        teacher_path = resolve_model_path(cfg.teacher)
        if not Path(str(teacher_path)).is_dir():
            raise ValueError(f"--teacher: {teacher_path} is not a local model folder")
        tconf = AutoConfig.from_pretrained(teacher_path)
        positions = getattr(tconf, "max_position_embeddings", None)
        if positions is not None:
            if tconf.model_type in ("roberta", "xlm-roberta", "camembert"):  # positions start after the pad id
                positions -= (tconf.pad_token_id or 0) + 1
            if cfg.max_length > positions:
                raise ValueError(f"--max-length: expected at most {positions} (the teacher's position embeddings), "
                                 f"got {cfg.max_length}")
        shapes = Shapes(tconf.num_hidden_layers, cfg.student_layers, tconf.hidden_size, cfg.student_hidden,
                        tconf.num_attention_heads, cfg.student_heads)
        params = make_params(cfg.method, cfg.overrides)
        self.recipe = build_recipe(cfg.method, shapes, params, mode=cfg.mode)  # mapping errors raise here
        if cfg.epochs is not None:
            for s in self.recipe.stages:
                s.epochs = cfg.epochs
        elif self.on_cpu:
            for s in self.recipe.stages:
                s.epochs = min(s.epochs, CPU_MAX_EPOCHS)
        self.shapes = shapes
        tokenizer = AutoTokenizer.from_pretrained(teacher_path)
        self.tokenizer = tokenizer
        # Fingerprint it before any call: a fast tokenizer's serialised state records the last truncation
        # settings, which differ when datasets serves a tokenised split from its cache (no call at all).
        self.tokenizer_fp = fingerprint_tokenizer(tokenizer)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        # None: the CPU default subset (all data on a GPU); 0: all data, on any device.
        n_train = (cfg.max_train_examples or None) if cfg.max_train_examples is not None else (
            CPU_TRAIN_EXAMPLES if self.on_cpu else None)
        n_dev = (cfg.max_dev_examples or None) if cfg.max_dev_examples is not None else (
            CPU_DEV_EXAMPLES if self.on_cpu else None)
        self.subset_note = ""
        if self.on_cpu:
            parts = []
            if cfg.max_train_examples is None:
                parts.append(f"a {n_train}-example training subset per data source")
            if cfg.max_dev_examples is None:
                parts.append(f"a {n_dev}-example dev subset")
            if cfg.epochs is None:
                parts.append(f"at most {CPU_MAX_EPOCHS} epoch(s) per stage")
            if parts:
                self.subset_note = ("CPU default profile (this machine has no GPU): " + ", ".join(parts)
                                    + "; a GPU run uses the full data and the papers' epochs")
                self.log(self.subset_note)
            if cfg.teacher_dtype == "auto":
                self.log("teacher: fp32 on the CPU (half-precision matmuls are slow on CPUs); fp16 on CUDA")

        # Data (missing data fails here, naming the paths tried).
        needs_general = any(s.data == "general" for s in self.recipe.stages)
        self.data: dict[str, Any] = {}
        names = None
        if cfg.mode == "task":
            train, dev, test, names = self._load_task_data(tokenizer)
            if cfg.finetune_examples is not None and not _has_task_head(tconf):  # only a fine-tune reads it
                n_ft = cfg.finetune_examples or None
                self.data["finetune"] = tokenize(self._subset(train, n_ft, self.finetune_seed), tokenizer,
                                                 cfg.max_length)
                self.log(f"teacher fine-tune data: {len(self.data['finetune'])} training examples "
                         f"(--finetune-examples {cfg.finetune_examples})")
            train = self._subset(train, n_train, cfg.seed)
            dev = self._subset(dev, n_dev, cfg.seed) if dev is not None else None
            self.data["task"] = tokenize(train, tokenizer, cfg.max_length)
            self.data["dev"] = tokenize(dev, tokenizer, cfg.max_length) if dev is not None else None
            self.data["test"] = tokenize(test, tokenizer, cfg.max_length) if test is not None else None
            self.label_names = names
        if needs_general or cfg.mode == "general":
            # --mode general distils on --general-corpus (default: the --task's training texts, labels
            # dropped); ERNIE-Tiny's general stages in task mode default to AG News.
            corpus = cfg.general_corpus or (cfg.task if cfg.mode == "general" else "agnews")
            gen = self._load_texts(corpus, "train", general=True)
            gen = self._subset(gen, n_train, cfg.seed + 1)
            gen = gen.remove_columns([c for c in gen.column_names if c != "text"])
            self.data["general"] = tokenize(gen, tokenizer, cfg.max_length)

        # Teachers.
        pretrained_has_head = _has_task_head(tconf)
        self.teachers: dict[str, nn.Module] = {}
        tdtype = self._dtype()
        finetuned_path = teacher_path
        if cfg.mode == "task":
            if pretrained_has_head:
                t_names = [str(tconf.id2label[i]) for i in sorted(tconf.id2label)]
                named = not any(re.fullmatch(r"LABEL_\d+|\d+", n) for n in t_names + names)
                if tconf.num_labels == len(names) and named and [n.lower() for n in t_names] != [
                        n.lower() for n in names]:
                    raise ValueError(
                        f"--teacher: its task head predicts {t_names} but {cfg.task}'s labels are {names} (in id "
                        f"order); use a teacher fine-tuned on this task or its pretrained encoder")
                if tconf.num_labels != len(names):
                    raise ValueError(
                        f"--teacher: its task head has {tconf.num_labels} labels "
                        f"({list(tconf.id2label.values())}) but {cfg.task} has {len(names)} ({names}); use a "
                        f"teacher fine-tuned on this task or its pretrained encoder (fastkd then fine-tunes it)")
            else:
                # CPU profile: one epoch at a higher lr, word embeddings frozen (their AdamW update dominates).
                ft = FinetuneConfig(epochs=cfg.finetune_epochs or (1 if self.on_cpu else 3),
                                    seed=self.finetune_seed, lr=1e-4 if self.on_cpu else 5e-5,
                                    batch_size=cfg.batch_size,
                                    freeze_word_embeddings=self.on_cpu)
                root = Path(cfg.cache_dir) if cfg.cache_dir else None
                train_ds = self.data.get("finetune", self.data["task"])
                fp = data_digest(list(train_ds["text"]), list(train_ds["label"]),
                                 list(train_ds["text_pair"]) if "text_pair" in train_ds.column_names else None)
                if self.dist.main:
                    finetuned_path = finetune_teacher(teacher_path, tokenizer, train_ds, self.data.get("dev"),
                                                      names, max_length=cfg.max_length, cfg=ft,
                                                      data_fingerprint=fp, device=self.device, root=root,
                                                      log=self.log)
                if self.dist.enabled:
                    import torch.distributed as tdist

                    box = [str(finetuned_path)]
                    tdist.broadcast_object_list(box, src=0)
                    finetuned_path = Path(box[0])
        self.teacher_paths = {"pretrained": teacher_path, "finetuned": finetuned_path}
        for kind in sorted({s.teacher for s in self.recipe.stages}):
            path = self.teacher_paths[kind]
            if kind == "finetuned" and cfg.mode == "task":
                model = AutoModelForSequenceClassification.from_pretrained(path, dtype=tdtype,
                                                                           attn_implementation="sdpa")
            else:
                model = AutoModel.from_pretrained(path, dtype=tdtype, attn_implementation="sdpa")
            model.to(self.device).eval().requires_grad_(False)
            self.teachers[kind] = model
        self.teacher_digest = {k: model_digest(p) for k, p in self.teacher_paths.items()}

        # Student.
        source = self.teachers["finetuned"] if "finetuned" in self.teachers else self.teachers["pretrained"]
        src32 = source if tdtype == torch.float32 else type(source).from_pretrained(
            self.teacher_paths["finetuned" if "finetuned" in self.teachers else "pretrained"],
            dtype=torch.float32, attn_implementation="sdpa")
        etd_ds = self.data["task"] if cfg.mode == "task" else self.data["general"]
        batches = etd_batches(etd_ds, cfg.batch_size, self.pad_id, cfg.seed)
        student, kept_hidden = make_student(
            src32.to(self.device), cfg, data=batches, log=self.log, num_batches=16 if self.on_cpu else 64,
            layers=mapped_teacher_layers(self.recipe, cfg.student_layers, shapes.teacher_layers))
        del src32
        self.module = DistillModule(student, shapes, self.recipe, kept_hidden).to(self.device)
        self.model = self.module
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.model = DDP(self.module, device_ids=[self.dist.local_rank] if not self.on_cpu else None,
                             find_unused_parameters=True)
        if self.dist.main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            if not cfg.resume:
                (self.out_dir / RUN_FILE).write_text(json.dumps(
                    {"identity": identity, "config": dataclasses.asdict(cfg), "started": time.strftime("%c"),
                     "recipe": describe(self.recipe)}, indent=1, default=str))
        self.log(describe(self.recipe))

    # ------------------------------------------------------------ checkpoints

    def save_checkpoint(self, state: dict, tag: str):
        if not self.dist.main:
            return
        ckdir = self.out_dir / "checkpoints"
        ckdir.mkdir(parents=True, exist_ok=True)
        path = ckdir / f"step-{state['global_step']}.pt"
        _atomic_save({**state, "model": self.module.state_dict(), "rng": _rng_state(), "tag": tag}, path)
        self.last_ckpt = path
        ckpts = sorted(ckdir.glob("step-*.pt"), key=lambda p: int(p.stem.split("-")[1]))
        for old in ckpts[:-self.cfg.keep_checkpoints]:
            old.unlink(missing_ok=True)

    # ------------------------------------------------------------ metrics

    def _metric(self, record: dict):
        if not self.dist.main:
            return
        if self.metrics_file is None:
            self.metrics_file = open(self.out_dir / "metrics.jsonl", "a")
        self.metrics_file.write(json.dumps(record) + "\n")
        self.metrics_file.flush()

    def _truncate_metrics(self, step: int):
        """On resume, drop records written after the checkpoint (they will be produced again)."""
        f = self.out_dir / "metrics.jsonl"
        if not f.is_file() or not self.dist.main:
            return
        keep = []
        for line in f.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by the kill
            if rec.get("step", 0) <= step:
                keep.append(line)
        f.write_text("".join(x + "\n" for x in keep))

    # ------------------------------------------------------------ training

    def _device_cache_budget(self) -> int | None:
        """Bytes a device cache may take: half of what is free on the GPU, leaving the student's training room
        (over it, --cache device runs the teacher live and auto picks the host cache); None without a GPU."""
        return int(torch.cuda.mem_get_info(self.device)[0] * 0.5) if self.device.type == "cuda" else None

    def _cache_dtype(self) -> torch.dtype:
        """The cached activations' dtype: bf16 for a bf16 teacher (fp16 cannot hold its range), else fp16."""
        return torch.bfloat16 if self._dtype() == torch.bfloat16 else torch.float16

    def _auto_cache_mode(self, stage: Stage, fields: list[str]) -> str:
        """--cache auto: "device" on a single GPU when the dataset's activations fit the budget, else "memory"."""
        budget = self._device_cache_budget()
        token_fields = [f for f in fields if seq_dim(f) is not None]
        labels = len(getattr(self, "label_names", None) or [])  # logits: one value per label and example
        need = DeviceCache.bytes_needed(self.data[stage.data]["length"], len(token_fields) * self.shapes.teacher_hidden,
                                        (len(fields) - len(token_fields)) * labels, self._cache_dtype())
        # Under DDP each rank meets other examples every epoch (hit rate ~1/world_size): a whole-dataset
        # buffer per GPU would mostly sit unread, so auto stays on the host there.
        mode = "device" if budget is not None and need <= budget and not self.dist.enabled else "memory"
        self.log(f"teacher cache (auto): {mode} for stage {stage.name} ({need / 2**30:.2f} GiB of activations"
                 + (f", GPU budget {budget / 2**30:.1f} GiB)" if budget is not None else "; no GPU)"))
        return mode

    def _make_cache(self, stage_idx: int, stage: Stage, fields: list[str]):
        cfg = self.cfg
        if cfg.cache == "off" or not fields:  # a stage that needs nothing from the teacher (e.g. a fine-tune)
            return None
        mode = cfg.cache
        if mode in ("auto", "memory", "device") and self.dist.enabled and stage.epochs > 1:
            self.log("teacher cache: under DDP each rank sees other examples every epoch, so a memory or device "
                     "cache hits about 1/world_size of the time; use --cache disk to share activations between ranks")
        if mode in ("auto", "memory", "device") and stage.epochs < 2:
            what = "" if mode == "auto" else f"{mode} "
            self.log(f"teacher cache: stage {stage.name} runs one epoch, so a {what}cache would never be read; "
                     f"not storing (use --cache disk to keep activations for later runs)")
            return None
        if mode == "auto":
            mode = self._auto_cache_mode(stage, fields)
        if mode == "device":
            return DeviceCache(self.data[stage.data]["length"], self.device, dtype=self._cache_dtype(),
                               budget_bytes=self._device_cache_budget())
        data_fp = fingerprint_dataset(self.data[stage.data])
        key = TeacherCache.make_key(teacher=self.teacher_digest[stage.teacher], data=data_fp,
                                    tokenizer=self.tokenizer_fp, max_length=cfg.max_length,
                                    dtype=str(self._dtype()), fields=fields)
        root = Path(cfg.cache_dir) / "activations" if cfg.cache_dir else None
        return TeacherCache(mode, root, key, rank=self.dist.rank)

    def train(self) -> dict:
        cfg = self.cfg
        ckpt = None
        if cfg.resume:
            path = latest_checkpoint(self.out_dir)
            if path is not None:
                ckpt = torch.load(path, map_location="cpu", weights_only=False)
                self.module.load_state_dict(ckpt["model"])
                self.last_ckpt = path
                self._truncate_metrics(ckpt["global_step"])
                self.log(f"resume: from {path} (stage {ckpt['stage'] + 1}, epoch {ckpt['epoch'] + 1}, "
                         f"step {ckpt['global_step']})")
            else:
                self.log(f"resume: no checkpoint in {self.out_dir}; starting from the beginning")
                self._truncate_metrics(0)
        self.best = ckpt["best"] if ckpt else None
        self.global_step = ckpt["global_step"] if ckpt else 0
        first_stage = ckpt["stage"] if ckpt else 0
        amp = self._amp()
        scaler = torch.amp.GradScaler("cuda", enabled=amp == torch.float16)
        torch.manual_seed(cfg.seed + self.dist.rank)
        heads = [i for i, s in enumerate(self.recipe.stages) if s.trains_head]
        self.last_head_stage = heads[-1] if heads else None
        for si in range(first_stage, len(self.recipe.stages)):
            stage = self.recipe.stages[si]
            self.module.set_stage(stage)
            fields = plan_fields(capture_plan(stage.terms, "teacher"), self.shapes.teacher_layers)
            cache = self._make_cache(si, stage, fields)
            runner = TeacherRunner(self.teachers[stage.teacher], fields, cache, self.device)
            data = self.data[stage.data]
            if stage.needs_labels and "label" not in data.column_names:
                raise ValueError(f"stage {stage.name}: needs labels but its data has none")
            sampler = LengthBucketSampler(data["length"], cfg.batch_size, seed=cfg.seed + si, shuffle=True,
                                          rank=self.dist.rank, world_size=self.dist.world_size)
            steps_per_epoch = max(1, math.ceil(len(sampler) / cfg.grad_accum))
            total = steps_per_epoch * stage.epochs
            params = [p for p in self.module.parameters() if p.requires_grad]
            opt = torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
                                     {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                                    lr=stage.lr, fused=not self.on_cpu)
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(total, int(cfg.warmup * total)))
            first_epoch, stage_step, resume_sampler = 0, 0, None
            if ckpt is not None:  # the resumed stage: restore its optimizer state unless it had not started
                if ckpt["stage_step"] or ckpt["epoch"] or ckpt["sampler"] is not None:
                    opt.load_state_dict(ckpt["optimizer"])
                    sched.load_state_dict(ckpt["scheduler"])
                    scaler.load_state_dict(ckpt["scaler"])
                first_epoch, stage_step, resume_sampler = ckpt["epoch"], ckpt["stage_step"], ckpt["sampler"]
                _set_rng_state(ckpt["rng"])
                ckpt = None
            self.log(f"stage {si + 1}/{len(self.recipe.stages)} {stage.name}: {stage.epochs} epoch(s) x "
                     f"{steps_per_epoch} steps, {len(data)} examples ({stage.data} data, {stage.teacher} teacher)")
            for epoch in range(first_epoch, stage.epochs):
                sampler.set_epoch(epoch)
                if resume_sampler is not None:
                    sampler.load_state_dict(resume_sampler)
                    resume_sampler = None
                stage_step = self._run_epoch(si, stage, epoch, sampler, data, runner, opt, sched, scaler, amp,
                                             stage_step, total)
                if cache is not None and cfg.cache == "disk":
                    # Ranks see different examples each epoch: share what each stored through the disk shards.
                    cache.flush()
                    if self.dist.enabled:
                        import torch.distributed as tdist

                        tdist.barrier()
                        if hasattr(cache, "refresh"):
                            cache.refresh()
                self._end_epoch(si, stage, epoch, sampler, opt, sched, scaler, stage_step)
            self.teacher_calls += runner.calls
            if cache is not None:
                cache.flush()
                st = dict(cache.stats)
                st.update(stage=stage.name, teacher_forwards=runner.calls)
                self.cache_stats.append(st)
                self.log(f"teacher cache ({st['mode']}) for {stage.name}: {st.get('bytes', 0) / 2**20:.1f} MiB, "
                         f"hit rate {st.get('hit_rate', 0):.2f}, live teacher forwards {runner.calls}"
                         + (f"; {st['note']}" if st.get("note") else ""))
                self._metric({"step": self.global_step, "stage": stage.name, "event": "cache", **st})
            del cache, runner
        return {"best": self.best}

    def _run_epoch(self, si, stage, epoch, sampler, data, runner, opt, sched, scaler, amp, stage_step, total):
        from tqdm import tqdm

        cfg = self.cfg
        # DataLoader workers draw batches ahead, so the resume point is the count this loop consumed.
        consumed = sampler.state_dict()["batches_done"]
        bar = tqdm(total=len(sampler), initial=consumed, desc=f"{stage.name} e{epoch + 1}", file=sys.stderr,
                   disable=not (cfg.progress and self.dist.main), dynamic_ncols=True, unit="batch")
        self.module.train()
        micro, window_samples, t_window = 0, 0, time.perf_counter()
        acc_terms: dict[str, float] = {}
        cuda = self.device.type == "cuda"
        batches = batches_for_epoch(sampler, data, self.pad_id, num_workers=2 if cuda else 0, pin_memory=cuda)
        batch = next(batches, None)
        while batch is not None:
            nxt_batch = None
            consumed += 1
            host, batch = batch, batch.to(self.device, non_blocking=cuda)
            t_out = runner(batch, host)
            # Peek whether this is the epoch's last micro-batch: a partial accumulation window still steps.
            last_micro = (micro + 1) % cfg.grad_accum == 0
            if not last_micro:
                nxt_batch = next(batches, None)
                last_micro = nxt_batch is None
            no_sync = self.dist.enabled and not last_micro
            with self.model.no_sync() if no_sync else contextlib.nullcontext():
                with torch.autocast(self.device.type, dtype=amp or torch.float32, enabled=amp is not None):
                    total_loss, terms = self.model(batch.input_ids, batch.attention_mask, batch.labels, t_out,
                                                   batch.token_type_ids)
                # One device->host transfer per micro-step serves both the NaN/inf check (before backward, so
                # the weights are never touched by a bad step) and the logged running sums.
                values = self._check_finite(terms, stage)
                scaler.scale(total_loss / cfg.grad_accum).backward()
            micro += 1
            window_samples += batch.input_ids.shape[0]
            for k, v in values.items():
                acc_terms[k] = acc_terms.get(k, 0.0) + v / cfg.grad_accum
            bar.update(1)
            if not last_micro:
                batch = nxt_batch
                continue
            micro = 0
            scaler.unscale_(opt)
            if cfg.max_grad_norm > 0:  # clip_grad_norm_ with 0 would zero every gradient, not switch clipping off
                torch.nn.utils.clip_grad_norm_(self.module.parameters(), cfg.max_grad_norm)
            scaler.step(opt)
            scaler.update()
            sched.step()
            opt.zero_grad(set_to_none=True)
            if self.module.has_emd:
                self.module.update_emd_weights(self.dist)
            stage_step += 1
            self.global_step += 1
            if self.global_step % cfg.log_every == 0 or stage_step == total:
                dt = time.perf_counter() - t_window
                rate = window_samples * self.dist.world_size / max(dt, 1e-9)
                rec = {"step": self.global_step, "stage": stage.name, "epoch": epoch,
                       "loss": sum(acc_terms.values()), **{f"loss_{k}": v for k, v in acc_terms.items()},
                       "lr": sched.get_last_lr()[0], "samples_per_s": rate}
                if self.module.has_emd:
                    rec["emd_w_s"] = self.module.emd_w_s.tolist()
                    rec["emd_w_t"] = self.module.emd_w_t.tolist()
                self._metric(rec)
                bar.set_postfix(loss=f"{rec['loss']:.4f}", samples_s=f"{rate:.0f}")
                window_samples, t_window = 0, time.perf_counter()
            acc_terms = {}
            if cfg.save_every and self.global_step % cfg.save_every == 0:
                self.save_checkpoint(self._state(si, epoch, stage_step, sampler, opt, sched, scaler, consumed),
                                     "step")
            if _STEP_DELAY:  # crash-recovery tests slow the run down so a kill lands mid-epoch
                time.sleep(_STEP_DELAY)
            batch = nxt_batch if nxt_batch is not None else next(batches, None)
        bar.close()
        return stage_step

    def _state(self, si, epoch, stage_step, sampler, opt, sched, scaler, consumed: int | None = None) -> dict:
        return {"stage": si, "epoch": epoch, "global_step": self.global_step, "stage_step": stage_step,
                "sampler": sampler.state_dict(consumed) if sampler is not None else None,
                "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "scaler": scaler.state_dict(),
                "best": self.best}

    def _check_finite(self, terms, stage) -> dict[str, float]:
        """The loss terms as floats (one sync for all of them); raises on NaN/inf naming step and term."""
        flat = torch.stack([v.detach().float().reshape(()) for v in terms.values()]).tolist()
        vals = dict(zip(terms, flat, strict=True))
        if all(math.isfinite(v) for v in vals.values()):
            return vals
        bad = {k: v for k, v in vals.items() if not math.isfinite(v)}
        raise NonFiniteLossError(
            f"non-finite loss at step {self.global_step + 1} (stage {stage.name}): term "
            f"{', '.join(f'{k}={v}' for k, v in bad.items())}; last good checkpoint: "
            f"{self.last_ckpt or 'none (no checkpoint written yet)'}")

    def _end_epoch(self, si, stage, epoch, sampler, opt, sched, scaler, stage_step):
        rec = {"step": self.global_step, "stage": stage.name, "epoch": epoch, "event": "eval"}
        student = self.module.student
        if self.data.get("dev") is not None and hasattr(student, "classifier"):
            acc = evaluate(student, self.data["dev"], 64, self.device, self.pad_id)
            rec["dev_acc"] = acc
            self.log(f"stage {stage.name} epoch {epoch + 1}: dev acc {acc:.4f}")
            if si == self.last_head_stage and (self.best is None or acc > self.best["dev_acc"]):
                self.best = {"dev_acc": acc, "stage": stage.name, "epoch": epoch, "step": self.global_step}
                if self.dist.main:
                    student.save_pretrained(self.out_dir / "best")
                rec["best"] = True
        self._metric(rec)
        # The epoch-end checkpoint resumes at the next epoch (or the next stage).
        last_epoch = epoch + 1 >= stage.epochs
        st = self._state(si, epoch, stage_step, sampler, opt, sched, scaler)
        if last_epoch:
            st.update(stage=si + 1, epoch=0, stage_step=0, sampler=None)
        else:
            st.update(epoch=epoch + 1, sampler=None)
        self.save_checkpoint(st, "epoch")

    # ------------------------------------------------------------ finish

    def finish(self, t_start: float) -> dict:
        from transformers import AutoModelForSequenceClassification

        cfg = self.cfg
        student = self.module.student
        final_dir = self.out_dir / "student"
        if self.best is not None and (self.out_dir / "best").is_dir():
            student = type(student).from_pretrained(self.out_dir / "best", dtype=torch.float32).to(self.device)
            self.log(f"student: best dev checkpoint (stage {self.best['stage']}, epoch {self.best['epoch'] + 1}, "
                     f"dev acc {self.best['dev_acc']:.4f})")
        result: dict[str, Any] = {"output_dir": str(self.out_dir), "student_dir": str(final_dir)}
        if not self.dist.main:
            return result
        student.save_pretrained(final_dir)
        self.tokenizer.save_pretrained(final_dir)
        teacher_kind = "finetuned" if "finetuned" in self.teachers else "pretrained"
        t_path = self.teacher_paths[teacher_kind]
        if cfg.mode == "task" and self.data.get("test") is not None:
            teacher32 = AutoModelForSequenceClassification.from_pretrained(t_path, dtype=torch.float32).to(self.device)
            result["teacher_test_acc"] = evaluate(teacher32, self.data["test"], 64, self.device, self.pad_id)
            result["student_test_acc"] = evaluate(student, self.data["test"], 64, self.device, self.pad_id)
            result["test_examples"] = len(self.data["test"])
        else:
            from transformers import AutoModel

            teacher32 = AutoModel.from_pretrained(t_path, dtype=torch.float32)
        # the latency is measured on a median-length example of the data held out from training, when there is any
        ref = next(self.data[k] for k in ("test", "dev", "task", "general") if self.data.get(k) is not None)
        result["teacher_params"] = count_params(teacher32)
        result["student_params"] = count_params(student)
        lengths = sorted(ref["length"])
        median_len = int(lengths[len(lengths) // 2])
        ids = next(r for r in ref if r["length"] == median_len)["input_ids"]
        result["latency_tokens"] = median_len
        result["teacher_latency_ms"] = cpu_latency_ms(teacher32, ids, cfg.latency_runs)
        result["student_latency_ms"] = cpu_latency_ms(student, ids, cfg.latency_runs)
        result["speedup"] = result["teacher_latency_ms"] / result["student_latency_ms"]
        result["teacher_forwards"] = self.teacher_calls
        result["cache"] = self.cache_stats
        result["wall_s"] = time.time() - t_start
        result["best"] = self.best
        (self.out_dir / "result.json").write_text(json.dumps(result, indent=1, default=str))
        self._metric({"step": self.global_step, "event": "final", **{k: v for k, v in result.items()
                                                                     if k != "cache"}})
        plot_losses(self.out_dir / "metrics.jsonl", self.out_dir / "loss.png")
        return result


def plot_losses(metrics: Path, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()] if metrics.is_file() else []
    recs = [r for r in recs if "loss" in r and "event" not in r]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    keys = sorted({k for r in recs for k in r if k.startswith("loss_")})
    for k in ["loss", *keys]:
        xs = [r["step"] for r in recs if k in r]
        ys = [r[k] for r in recs if k in r]
        if xs:
            ax.plot(xs, ys, label=k, lw=1.5 if k == "loss" else 1)
    for a, b in zip(recs, recs[1:], strict=False):
        if a["stage"] != b["stage"]:
            ax.axvline(b["step"], color="grey", ls=":", lw=1)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    positive = all(r[k] > 0 for r in recs for k in r if k.startswith("loss"))
    ax.set_yscale("log" if positive else "symlog", **({} if positive else {"linthresh": 1e-3}))
    ax.legend(fontsize=8)
    ax.set_title("fastkd distillation losses")
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


def run(cfg: TrainConfig, log=print) -> dict:
    """Set up (every check before training), train, evaluate and save; returns the final metrics."""
    t0 = time.time()
    trainer = Trainer(cfg, log)
    trainer.setup()
    trainer.train()
    result = trainer.finish(t0)
    result["trainer"] = trainer
    return result


def report(result: dict, note: str) -> str:
    lines = []
    if note:
        lines.append(note)
    if "teacher_test_acc" in result:
        lines.append(f"teacher test accuracy: {result['teacher_test_acc']:.4f} ({result['test_examples']} examples)")
        lines.append(f"student test accuracy: {result['student_test_acc']:.4f}")
    if "student_params" in result:
        ratio = result["teacher_params"] / result["student_params"]
        lines.append(f"student size: {result['student_params'] / 1e6:.2f}M params (teacher "
                     f"{result['teacher_params'] / 1e6:.2f}M, {ratio:.2f}x smaller)")
        lines.append(f"speed-up: {result['speedup']:.2f}x (CPU batch-1 latency, {result['latency_tokens']} tokens: "
                     f"teacher {result['teacher_latency_ms']:.1f} ms, student {result['student_latency_ms']:.1f} ms)")
    lines.append(f"student saved to: {result['student_dir']} (metrics.jsonl, loss.png in {result['output_dir']})")
    lines.append(f"wall time: {result.get('wall_s', 0):.0f}s")
    return "\n".join(lines)


def quiet_libraries() -> None:
    """The CLI's output is fastkd's own lines and training progress bar. The libraries' per-call progress bars
    (datasets' map/cast, transformers' weight loading and saving) and transformers' load report (which lists the
    task head that fastkd adds on purpose as MISSING) would bury them; their errors still show."""
    import datasets
    from transformers.utils import logging as hf_logging

    datasets.disable_progress_bars()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = parse_config(argv)
        quiet_libraries()
        t0 = time.time()
        trainer = Trainer(cfg)
        trainer.setup()
        trainer.train()
        result = trainer.finish(t0)
    except (ValueError, MappingError, FileNotFoundError, NonFiniteLossError) as e:
        print(f"fastkd.train: error: {e}", file=sys.stderr)
        return 2
    if trainer.dist.main:
        print(report(result, trainer.subset_note))
    if trainer.dist.enabled:
        import torch.distributed as tdist

        tdist.barrier()
        tdist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
