"""The trainer's options: :class:`TrainConfig`, its command line and its config files.

Each option is one field, declared with :func:`option`: its default, its help line, its choices or its check.
The command line (:func:`build_parser`), ``--help`` and the checks of a config built in code all come from those
fields, so adding an option is one field here.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import textwrap
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fastkd.data import LABEL_COLUMNS, TASKS, TEXT_COLUMNS
from fastkd.models.teacher import TEACHER_DTYPE_CHOICES
from fastkd.recipes import AUGMENT_CHOICES, load_config_file, method_entry, methods, parse_set, setting_prefix
from fastkd.training.rundata import CPU_DEV_EXAMPLES, CPU_TRAIN_EXAMPLES
from fastkd.training.tracking import check_report_to

DESCRIPTION = "fastkd's lean distillation trainer, e.g. python -m fastkd.train --method tinybert --etd impt"

# A check returns None when the value is fine, else what was expected.
Check = Callable[[Any], "str | None"]


def positive(v) -> str | None:
    return None if v is None or v >= 1 else "a positive integer"


def non_negative(v) -> str | None:
    return None if v is None or v >= 0 else "0 or a positive integer"


def count_or_all(v) -> str | None:
    return None if v is None or v >= 0 else "0 (all the data) or a positive count"


def fraction(v) -> str | None:
    return None if 0 <= v <= 1 else "a fraction of the steps in [0, 1]"


def probability(v) -> str | None:
    return None if 0 <= v <= 1 else "a probability in [0, 1]"


def finite_non_negative(v) -> str | None:
    return None if math.isfinite(v) and v >= 0 else "a finite number >= 0"


def one_of(choices) -> Check:
    """A check against fixed choices, or a function giving them (read at each check); its ``options`` serve the
    "did you mean" hint of a misspelt value."""
    def options() -> tuple:
        return tuple(choices() if callable(choices) else choices)

    def check(v) -> str | None:
        return None if v in options() else f"one of {', '.join(map(str, options()))}"

    check.options = options
    return check


def identity_fields(config_cls: type | None = None) -> tuple[str, ...]:
    """The options marked ``identity=True``: what a --resume may not change."""
    return tuple(f.name for f in dataclasses.fields(config_cls or TrainConfig) if f.metadata.get("identity"))


def run_identity(cfg) -> dict:
    """The run's identity: its identity options' values, as run.json records them."""
    return {name: getattr(cfg, name) for name in identity_fields(type(cfg))}


def did_you_mean(value, options) -> str:
    close = difflib.get_close_matches(str(value), [str(o) for o in options], n=1)
    return f" (did you mean {close[0]}?)" if close else ""


# A method in the recipes' registry (read at each check, so a method registered later is accepted).
registered_method = one_of(methods)


def option(default, help: str, *, choices: tuple[str, ...] | None = None, check: Check | None = None,
           flag: str | None = None, cli: bool = True, identity: bool = False):
    """A TrainConfig field with its CLI help, its choices or its check, and its flag (default ``--<name>``; a
    bool defaulting to True gets ``--no-<name>``). ``identity``: part of the run's identity, which a --resume may
    not change (the data, the models, the schedule: what the checkpoints were made with)."""
    meta = {"help": help, "choices": choices, "check": check or (one_of(choices) if choices else None),
            "flag": flag, "cli": cli, "identity": identity}
    if isinstance(default, dict):
        return field(default_factory=dict, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    method: str = option("tinybert", "a registered method (each with its settings below)", check=registered_method,
                         identity=True)
    mode: str = option("task", "task: distil on a labelled task (the student gets a classifier head); general: "
                       "task-agnostic distillation on unlabelled text (a general student, to fine-tune later)",
                       choices=("task", "general"), identity=True)
    task: str = option("sst2", f"task name ({', '.join(TASKS)}; read from FASTKD_DATA_DIR, else the hub) or a "
                       "labelled .tsv/.csv/.json(l) file with text (or sentence-pair) and label columns", identity=True)
    dev: str | None = option(None, "dev data for evaluation and best-checkpoint selection: task name or file "
                             "(default: the task's own dev split, a task name's or a folder's dev file; else a fixed "
                             "held-out slice of train, as for AG News)")
    test: str | None = option(None, "test data for the final report: task name or file (default: the task's own "
                              "test split, a task name's or a folder's test file; a single file has none)")
    general_corpus: str | None = option(None, "unlabelled text: a task name or a file (default: --task in general "
                                        "mode, agnews for ERNIE-Tiny's general stages)")
    text_column: str | None = option(None, "the text column of data files whose header names it otherwise "
                                     f"(default: the first of {', '.join(TEXT_COLUMNS)}, else the first text column)",
                                     identity=True)
    label_column: str | None = option(None, "the label column of data files whose header names it otherwise "
                                      f"(default: the first of {', '.join(LABEL_COLUMNS)})", identity=True)
    text_pair_column: str | None = option(None, "the second text of sentence-pair data files (default: found by "
                                          "name: sentence1/sentence2, question1/question2, premise/hypothesis, "
                                          "question/sentence, text_a/text_b)", identity=True)
    teacher: str | None = option(None, "local model folder, with or without a task head (default: the packaged "
                                 "MiniLM); a teacher without a head is fine-tuned first and cached", identity=True)
    output_dir: str | None = option(None, "where the run writes checkpoints, metrics.jsonl, loss.png and the "
                                    "student (default: runs/<method>-<task>-<time>)")
    student: str | None = option(None, "a pretrained student instead of one made from the teacher: a local model "
                                 "folder of any supported encoder family, of any width; its own sizes replace "
                                 "--student-layers/-hidden/-heads/-ffn, and it must read the teacher's tokenizer",
                                 identity=True)
    etd: str = option("auto", "student initialisation: extract the teacher's weights by importance (impt) or at "
                      "random (rand), or none (random initialisation); auto: impt wherever the teacher's family "
                      "and the student's sizes allow ETD, else none (the log says which)",
                      choices=("auto", "impt", "rand", "none"), identity=True)
    student_layers: int = option(3, "student depth", check=positive, identity=True)
    student_hidden: int = option(384, "student width", check=positive, identity=True)
    student_heads: int = option(12, "student attention heads", check=positive, identity=True)
    student_ffn: int = option(1536, "student FFN width", check=positive, identity=True)
    batch_size: int = option(32, "examples per micro-batch", check=positive, identity=True)
    grad_accum: int = option(1, "micro-batches per optimizer step", check=positive, identity=True)
    max_length: int = option(128, "tokens per example at most (batches are padded to their longest example only)",
                             check=positive, identity=True)
    warmup: float = option(0.1, "fraction of each stage's steps spent in linear warm-up", check=fraction)
    weight_decay: float = option(0.01, "AdamW weight decay", check=finite_non_negative)
    max_grad_norm: float = option(1.0, "gradient clipping norm (0: off)", check=finite_non_negative)
    epochs: int | None = option(None, "epochs of every stage (default: each recipe's own; 1 on a CPU)", check=positive,
                                identity=True)
    max_train_examples: int | None = option(None, "training examples, a seeded subset (0: all; default: all on a "
                                            f"GPU, {CPU_TRAIN_EXAMPLES} on a CPU)", check=count_or_all, identity=True)
    max_dev_examples: int | None = option(None, f"dev examples (0: all; default: all on a GPU, {CPU_DEV_EXAMPLES} "
                                          "on a CPU)", check=count_or_all)
    teacher_dtype: str = option("auto", "precision of the frozen teacher (auto: fp16 on CUDA; bf16 on a CPU with "
                                "native bf16 (AVX512-BF16, AMX), else fp32)", choices=TEACHER_DTYPE_CHOICES)
    amp: str = option("auto", "student autocast (auto: bf16 where the device computes it natively, a CPU with "
                      "AVX512-BF16/AMX included; else fp16 with loss scaling on CUDA, off on a CPU)",
                      choices=("auto", "bf16", "fp16", "off"))
    cache: str = option("auto", "teacher activations: host memory, disk shards (reused by later runs), or "
                        "accelerator memory (device: one gather per field and batch); auto = device on a single GPU "
                        "when the dataset's activations fit half its free memory, else memory",
                        choices=("auto", "off", "memory", "disk", "device"))
    cache_dir: str | None = option(None, "fastkd's cache: the disk cache's shards (activations/) and the fine-tuned "
                                   "teachers (teachers/) (default: $FASTKD_CACHE_DIR, else ~/.cache/fastkd)")
    finetune_epochs: int | None = option(None, "epochs of the teacher's fine-tune, when it has no task head "
                                         "(default: 3 on a GPU, 1 on a CPU)", check=positive, identity=True)
    # None = the student's training data (the CPU subset on a CPU), 0 = all of the task's training data, N = a
    # seeded N-example subset. The fine-tune is cached, so a stronger teacher costs once per (teacher, data,
    # settings).
    finetune_examples: int | None = option(None, "teacher fine-tune data: 0 = all training examples (default: the "
                                           "student's data)", check=count_or_all, identity=True)
    # Fixing it lets runs with different --seed share one cached teacher, so a seed sweep measures the student's
    # variance, not the teacher's.
    finetune_seed: int | None = option(None, "seed of the teacher's fine-tune (default: --seed)", check=non_negative,
                                       identity=True)
    save_every: int = option(0, "checkpoint every N optimizer steps (0: only at each epoch's end)",
                             check=non_negative)
    keep_checkpoints: int = option(2, "checkpoints kept on disk during the run (the newest)", check=positive)
    keep_run_checkpoints: bool = option(False, "keep the mid-run checkpoints after the run finishes (by default "
                                        "they are removed once the student is saved; a killed run keeps them for "
                                        "--resume)")
    resume: bool = option(False, "continue the run in --output-dir from its last checkpoint")
    seed: int = option(0, "seed of data order, dropout and ETD-Rand", check=non_negative, identity=True)
    log_every: int = option(10, "optimizer steps between metrics.jsonl lines", check=positive)
    eval_every: int = option(0, "dev evaluation every N optimizer steps, counted over all stages, besides each "
                             "epoch's end (0: only there); each eval line records train_s, the training time so far "
                             "without evaluations and checkpoints", check=non_negative)
    report_to: str = option("none", "also send the metrics to tensorboard (<output-dir>/tensorboard), wandb, or "
                            "several (comma-separated), through their own libraries", check=check_report_to)
    latency_runs: int = option(20, "timed batch-1 forward passes per model for the final CPU speed-up, teacher and "
                               "student alternating (the median pair ratio and its 10-90%% spread are reported)",
                               check=positive)
    augment: str = option("off", "TinyBERT's data augmentation (python -m fastkd.augment makes the same data on its "
                          "own): on = the stages whose paper trains on augmented data read the task data and its "
                          "copies (TinyBERT's intermediate stage, BERT-EMD); all-stages = every task stage",
                          choices=AUGMENT_CHOICES, identity=True)
    augment_copies: int = option(30, "augmented copies per training example (TinyBERT's N)", check=positive,
                                 identity=True)
    augment_candidates: int = option(15, "replacement candidates per word (TinyBERT's M)", check=positive,
                                     identity=True)
    augment_p: float = option(0.4, "probability that a word is replaced (TinyBERT's p)", check=probability,
                              identity=True)
    augment_mlm: str | None = option(None, "a fill-mask model (folder or cached hub name) for single-piece words, "
                                     "as TinyBERT uses BERT-base's (default: none ships offline, so every word "
                                     "takes its neighbours in the teacher's input embeddings)", identity=True)
    augment_embeddings: str | None = option(None, "a GloVe-format text file for the neighbours of multi-piece words "
                                            "(default: the masked LM's, else the teacher's input embeddings)",
                                            identity=True)
    progress: bool = option(True, "no progress bar", flag="--no-progress")
    overrides: dict[str, Any] = option({}, "recipe overrides (from --set and --config)", cli=False, identity=True)

    def __post_init__(self):
        # Checked here, not only by the CLI, so a config built in code is held to the same rules.
        for f in dataclasses.fields(self):
            check = f.metadata.get("check")
            expected = check(getattr(self, f.name)) if check else None
            if expected:
                value = getattr(self, f.name)
                hint = did_you_mean(value, check.options()) if hasattr(check, "options") else ""
                raise ValueError(f"--{f.name.replace('_', '-')}: expected {expected}, got {value!r}{hint}")


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
    for method in methods():
        cls = method_entry(method).params
        if cls in seen:
            continue
        seen.add(cls)
        names = [m for m in methods() if method_entry(m).params is cls]
        prefix = setting_prefix(method)
        defaults = cls()
        fields = ", ".join(f"{f.name}={getattr(defaults, f.name)}" for f in dataclasses.fields(cls))
        lines.append(textwrap.fill(fields, 100, initial_indent=f"  {'/'.join(names)} ({prefix}.FIELD): ",
                                   subsequent_indent="      "))
    return "\n".join(lines)


_TYPES = {"int": int, "float": float, "str": str}


def _add_option(p: argparse.ArgumentParser, f: dataclasses.Field) -> None:
    meta, default = f.metadata, f.default
    flag = meta["flag"] or "--" + f.name.replace("_", "-")
    if isinstance(default, bool):
        p.add_argument(flag, dest=f.name, action="store_false" if default else "store_true", help=meta["help"])
        return
    annotation = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    kind = _TYPES[annotation.split(" ")[0]]
    # Choices are checked by the field's own check (with its "did you mean"), not argparse; --help shows them.
    metavar = "{" + ",".join(meta["choices"]) + "}" if meta["choices"] else None
    p.add_argument(flag, dest=f.name, default=default, help=meta["help"], metavar=metavar,
                   type=None if kind is str else kind)


def build_parser(config_cls: type = None) -> argparse.ArgumentParser:
    """The CLI: one flag per field of ``config_cls`` (TrainConfig), plus --set and --config (recipe overrides)."""
    p = argparse.ArgumentParser(prog="python -m fastkd.train", description=DESCRIPTION,
                                formatter_class=_HelpFormatter, epilog=recipe_settings_help())
    for f in dataclasses.fields(config_cls or TrainConfig):
        if f.metadata.get("cli", True):
            _add_option(p, f)
    p.add_argument("--set", action="append", default=[], metavar="METHOD.FIELD=VALUE",
                   help="override a recipe setting, e.g. tinybert.att_weight=2 (repeatable; the settings are "
                        "listed below)")
    p.add_argument("--config", default=None,
                   help="JSON/YAML file of recipe overrides (+ a 'train' section of the options above)")
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
    return TrainConfig(**values, overrides=overrides)
