"""The student: extracted from the teacher by ETD or randomly initialised."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from fastkd.distill.distiller import check_families, token_level_terms
from fastkd.models.encoder import resized_config
from fastkd.recipes import Recipe
from fastkd.training.batching import Batch, LengthBucketSampler, collate
from fastkd.training.engine import batches_for_epoch


@dataclass(frozen=True)
class StudentSettings:
    """The run's student: a pretrained one (``path``, --student) or one made from the teacher (``etd``: auto,
    impt, rand or none) with these sizes; ``seed`` seeds its initialisation and ETD-Rand."""

    path: str | None = None
    etd: str = "auto"
    layers: int = 3
    hidden: int = 384
    heads: int = 12
    ffn: int = 1536
    seed: int = 0


def etd_batches(dataset, batch_size: int, pad_token_id: int, seed: int):
    """Labelled (when known) batches as dicts for fastkd.student.etd's importance pass."""
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


def student_sizes(st: StudentSettings) -> tuple[int, int, int]:
    """(layers, hidden, heads) of the run's student: a --student's own config, else --student-*."""
    if st.path is None:
        return st.layers, st.hidden, st.heads
    from transformers import AutoConfig

    from fastkd.models.families import num_heads

    if st.etd not in ("none", "auto"):
        raise ValueError(f"--etd: {st.etd} extracts a student from the teacher, and --student gives one; use one")
    if not Path(st.path).is_dir():
        raise ValueError(f"--student: expected a local model folder, got {st.path}")
    sc = AutoConfig.from_pretrained(st.path)
    return sc.num_hidden_layers, sc.hidden_size, num_heads(sc)


def check_student(st: StudentSettings, tconf, recipe: Recipe, teacher_tokenizer):
    """Before anything loads or trains: what the recipe reads must exist in both models' families (a student
    made from the teacher is of its class). Returns a --student's own tokenizer when it reads another
    vocabulary than the teacher's, which only logit KD can train across (None otherwise)."""
    from transformers import AutoConfig

    student_config = tconf if st.path is None else AutoConfig.from_pretrained(st.path)
    check_families(dict.fromkeys(("pretrained", "finetuned"), tconf), student_config, recipe)
    return None if st.path is None else student_tokenizer(st.path, student_config, teacher_tokenizer, recipe)


def student_tokenizer(path: str, student_config, teacher_tokenizer, recipe: Recipe):
    """A --student's own tokenizer when its vocabulary differs from the teacher's (then the recipe must read
    only logits: each model is fed its own tokenisation of the same text); None when it reads the teacher's."""
    from transformers import AutoTokenizer

    vocab = getattr(student_config, "vocab_size", None)
    try:
        own = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError):
        own = None  # a folder with weights only: it is taken to use the teacher's tokenizer
    differs = own is not None and own.get_vocab() != teacher_tokenizer.get_vocab()
    if not differs and (vocab is None or vocab >= len(teacher_tokenizer)):
        return None
    token_level = token_level_terms(recipe)
    why = "its own tokenizer differs" if differs else f"{vocab} embeddings for {len(teacher_tokenizer)} tokens"
    if own is None or token_level:
        raise ValueError(
            f"--student: {path} reads a different vocabulary from the teacher's tokenizer ({why}), so the "
            f"token-level terms {token_level} of {recipe.method} would compare different tokens"
            + (" and it has no tokenizer of its own to read the text with" if own is None else "")
            + ". Use a student with the teacher's tokenizer, or --method kd (logits on the shared labels: each "
              "model reads its own tokenisation)")
    return own


class StudentTokens:
    """The student's own tokenisation of the run's splits, for a --student with another tokenizer (logit KD):
    the same rows, looked up by example index, so both models see the same examples in the same batches."""

    def __init__(self, tokenizer, data: dict, max_length: int):
        from fastkd.data import tokenize

        self.tokenizer = tokenizer
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        drop = ("input_ids", "length", "index", "type_start")
        # The augmented data's first rows are the task data's, in order (fastkd.augment): tokenised as "task", it
        # serves batches of either by example index.
        data = {**data, "task": data["augmented"]} if data.get("augmented") is not None else data
        self.splits = {k: tokenize(v.remove_columns([c for c in drop if c in v.column_names]), tokenizer, max_length)
                       for k, v in data.items() if k in ("task", "dev", "test") and v is not None}

    def batch(self, batch: Batch, split: str = "task") -> Batch:
        """The student's batch of the same examples, on the teacher batch's device."""
        cols = self.splits[split][batch.index.tolist()]  # one columnar fetch of the batch's rows
        rows = [dict(zip(cols, values, strict=True)) for values in zip(*cols.values(), strict=True)]
        return collate(rows, self.pad_id).to(batch.input_ids.device)


def student_view(tokens: StudentTokens | None, data: dict, split: str, pad_id: int) -> tuple:
    """(dataset, pad id) the student is evaluated on: its own tokenisation when it has one."""
    return (data[split], pad_id) if tokens is None else (tokens.splits[split], tokens.pad_id)


def student_batch(tokens: StudentTokens | None, batch: Batch) -> tuple:
    """(input_ids, attention_mask, token_type_ids) the student reads for a teacher batch."""
    s = batch if tokens is None else tokens.batch(batch)
    return s.input_ids, s.attention_mask, s.token_type_ids


def etd_strategy(etd: str, teacher: nn.Module, sizes: tuple[int, int, int, int], log=print) -> str:
    """The student's initialisation for --etd: ``auto`` (the default) is ETD by importance wherever the teacher's
    family can be cut and every student size fits within the teacher's (a random-init student ends at the
    majority class on a CPU budget), else random initialisation, saying why."""
    if etd != "auto":
        return etd
    from fastkd.models.encoder import student_config

    layers, hidden, heads, ffn = sizes
    try:
        student_config(teacher, num_layers=layers, hidden_size=hidden, num_heads=heads,
                       intermediate_size=ffn)
    except ValueError as e:
        log(f"student: --etd auto: random initialisation, since ETD cannot make this student ({e})")
        return "none"
    log("student: --etd auto: ETD by importance (impt), the default wherever the teacher's family allows it; "
        "--etd none for random initialisation")
    return "impt"


def make_student(teacher: nn.Module, st: StudentSettings, data=None, log=print, num_batches: int = 64,
                 layers: list[int] | None = None) -> tuple[nn.Module, torch.Tensor | None]:
    """(student, kept teacher hidden dims or None): a pretrained ``--student`` with a fresh task head the
    teacher's size, ETD extraction (``--etd impt|rand``, fastkd.student.etd) or, with ``--etd none``, the
    teacher's class randomly initialised."""
    torch.manual_seed(st.seed)
    if st.path is not None:
        from fastkd.models.teacher import load_model

        tc = teacher.config
        student = load_model(st.path, head=True, num_labels=tc.num_labels, id2label=tc.id2label,
                             label2id=tc.label2id, problem_type=getattr(tc, "problem_type", None),
                             ignore_mismatched_sizes=True)
        sc = student.config
        log(f"student: {st.path} ({sc.model_type}, {sc.num_hidden_layers} layers x {sc.hidden_size}), its "
            f"task head sized to the teacher's {tc.num_labels} label(s)")
        return student, None
    strategy = etd_strategy(st.etd, teacher, (st.layers, st.hidden, st.heads, st.ffn), log)
    if strategy != "none":
        from fastkd.student.etd import extract_student

        log(f"student: extracting with ETD ({strategy}) from the teacher"
            + (f" (importance over {num_batches} batches)" if strategy == "impt" else "")
            + (f", teacher layers {layers} (the recipe's layer mapping)" if layers else ", uniform depth"))
        student, plan = extract_student(teacher, num_layers=st.layers, hidden_size=st.hidden, num_heads=st.heads,
                                        intermediate_size=st.ffn, strategy=strategy, data=data, seed=st.seed,
                                        num_batches=num_batches,
                                        layers=layers, return_plan=True)
        return student, plan.hidden
    # --etd none is plain random initialisation: the baseline ETD's savings are measured against.
    # (PKD's "first k teacher layers" init is what --etd rand gives at the teacher's own width.)
    log("student: --etd none: random initialisation")
    config = resized_config(teacher.config, num_layers=st.layers, hidden_size=st.hidden, num_heads=st.heads,
                            intermediate_size=st.ffn)
    return type(teacher)(config), None
