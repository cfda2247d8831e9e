"""The trainer's options: :class:`TrainConfig`, its command line and its config files."""

from __future__ import annotations

import argparse
import dataclasses
import math
import textwrap
from dataclasses import dataclass, field
from typing import Any

from fastkd.data import LABEL_COLUMNS, TASKS, TEXT_COLUMNS
from fastkd.recipes import METHODS, PARAMS, load_config_file, parse_set, setting_prefix

CPU_TRAIN_EXAMPLES = 3000  # the CPU default subset (full data on a GPU): ~1.5 min idle, < 10 min on a busy 2-core box
CPU_DEV_EXAMPLES = 500
CPU_MAX_EPOCHS = 1
DESCRIPTION = "fastkd's lean distillation trainer: ``python -m fastkd.train --method tinybert --etd impt``."

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
    p = argparse.ArgumentParser(prog="python -m fastkd.train", description=DESCRIPTION,
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

