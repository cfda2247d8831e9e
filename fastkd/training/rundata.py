"""A run's data: the task's train/dev/test splits, the teacher fine-tune's data and the general corpus, each
tokenised; the CPU profile's subsets. Missing data fails here, naming the paths tried, before any model loads."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

from fastkd.data import (
    LABEL_COLUMNS,
    TASKS,
    DataNotFoundError,
    has_splits,
    is_regression,
    label_names,
    load_texts,
    source_columns,
    tokenize,
)

# The CPU default profile (full data on a GPU). 20,000 examples: on them the default job's teacher reaches 0.87
# SST-2 test accuracy and its 3x384 student 97% of it within 15 minutes (measured on a 2-core CPU: teacher 0.8796,
# student 0.8612 = 97.9%, 6 min 29 s in all, the fine-tune 130 s); on 3,000 the teacher stopped at 0.798 and the
# student at 95% of it (issue #24). Sizes in between were not tried.
CPU_TRAIN_EXAMPLES = 20000
CPU_DEV_EXAMPLES = 500
CPU_MAX_EPOCHS = 1


@dataclass(frozen=True)
class DataSettings:
    """What a run reads and how much of it; the trainer builds it once from its options (--task, --dev, --test,
    --general-corpus, the column names, --max-length and the subset sizes)."""

    task: str
    mode: str = "task"
    dev: str | None = None
    test: str | None = None
    general_corpus: str | None = None
    text_column: str | None = None
    label_column: str | None = None
    text_pair_column: str | None = None
    max_length: int = 128
    max_train_examples: int | None = None  # None: the CPU default subset (all on a GPU); 0: all
    max_dev_examples: int | None = None
    finetune_examples: int | None = None  # the teacher fine-tune's own subset (None: the students' data)
    epochs_given: bool = False  # --epochs was set: the CPU profile's epoch cap is not in force
    seed: int = 0
    finetune_seed: int = 0
    augment: Any = None  # fastkd.augment.AugmentSettings for the stages that read augmented data, else None


@dataclass
class RunData:
    splits: dict[str, Any] = field(default_factory=dict)  # task, dev, test, finetune, general (tokenised)
    label_names: list[str] | None = None
    subset_note: str = ""  # what the CPU profile shrank, for the log and the report


def subset(ds, n: int | None, seed: int):
    if n is None or n >= len(ds):
        return ds
    return ds.shuffle(seed=seed).select(range(n))


def cpu_profile(d: DataSettings, on_cpu: bool) -> tuple[int | None, int | None, str]:
    """(train examples, dev examples, note): None = all; on a CPU the defaults are subsets."""
    # None: the CPU default subset (all data on a GPU); 0: all data, on any device.
    n_train = (d.max_train_examples or None) if d.max_train_examples is not None else (
        CPU_TRAIN_EXAMPLES if on_cpu else None)
    n_dev = (d.max_dev_examples or None) if d.max_dev_examples is not None else (
        CPU_DEV_EXAMPLES if on_cpu else None)
    parts = []
    if on_cpu and d.max_train_examples is None:
        parts.append(f"a {n_train}-example training subset per data source (on a 2-core CPU enough for the default "
                     f"job's teacher to reach 0.87 on SST-2 and its student 97% of it, in about 7 minutes)")
    if on_cpu and d.max_dev_examples is None:
        parts.append(f"a {n_dev}-example dev subset")
    if on_cpu and not d.epochs_given:
        parts.append(f"at most {CPU_MAX_EPOCHS} epoch(s) per stage (but for epochs set with --set)")
    note = ("CPU default profile (this machine has no GPU): " + ", ".join(parts)
            + "; a GPU run uses the full data and the papers' epochs") if parts else ""
    return n_train, n_dev, note


def _load(d: DataSettings, source, split: str, *, general: bool = False, names: list[str] | None = None,
          data=None):
    """``source``'s split; --text-column / --label-column / --text-pair-column name a data file's columns (a
    general corpus is read as single texts without labels, so it is asked for the text column only). ``names``:
    the training data's label names, so a dev/test file maps its labels to the same ids. ``data``: the
    Dataset/DatasetDict given in code for --task (``run(cfg, data=...)``), read in its place."""
    if data is not None and source == d.task:
        source = data
    return load_texts(source, split, text_column=d.text_column, label_column=None if general else d.label_column,
                      text_pair_column=None if general else d.text_pair_column,
                      label_names=None if isinstance(source, str) and source in TASKS else names)


def _check_labels(train, others: dict, names: list[str], task: str) -> None:
    """A classifier needs two classes in its training data, and dev/test may only hold labels it was trained on
    (one-class training trained silently at dev acc 1.0; an unseen test label was never caught)."""
    seen = set(train["label"])
    if len(seen) < 2:
        raise ValueError(f"--task: {task}'s training data holds a single class ({names[next(iter(seen))]!r}, "
                         f"{len(train)} rows); a classifier needs at least two")
    for split_name, (source, ds) in others.items():
        if ds is None or "label" not in ds.column_names:
            continue
        unseen = sorted(set(ds["label"]) - seen)
        if unseen:
            rows = sum(1 for y in ds["label"] if y in set(unseen))
            raise ValueError(f"--{split_name}: {source} has {rows} row(s) labelled "
                             f"{[names[i] if i < len(names) else i for i in unseen]}, which the training data "
                             f"never has (its labels: {[names[i] for i in sorted(seen)]})")


# A regression task's one output, as a label list: one output means regression everywhere downstream (the head's
# num_labels, the teacher fine-tune's MSE, evaluation by Pearson/Spearman); a one-class classifier is refused.
REGRESSION_LABELS = ["score"]


def _as_regression(split_name: str, source: str, ds):
    """A dev/test split of a regression task with float labels (class names there are a mismatch, not data)."""
    import datasets

    if ds is None or "label" not in ds.column_names:
        return ds
    if isinstance(ds.features["label"], datasets.ClassLabel):
        raise ValueError(f"--{split_name}: {source}'s labels are names ({ds.features['label'].names[:4]}) but the "
                         f"training labels are real numbers (a regression task); give it numeric labels")
    return ds.cast_column("label", datasets.Value("float32"))


def _check_class_ids(splits: dict, names: list[str], n_labels: int) -> None:
    for split_name, ds in splits.items():
        if ds is not None and "label" in ds.column_names and len(ds):
            lo, hi = min(ds["label"]), max(ds["label"])
            if lo < 0 or hi >= n_labels:
                raise ValueError(f"data: {split_name} labels span {lo}..{hi}, expected 0..{n_labels - 1} ({names})")


def augmented(train, settings, model, *, main: bool, share, log):
    """``train`` and its augmented copies (:mod:`fastkd.augment`, cached on disk): rank 0 (``main``) makes them;
    the others read the folder it wrote, whose path ``share`` hands them after the write."""
    import datasets

    from fastkd.augment import Augmenter, augment, augmented_folder

    out = folder = None
    if main:
        augmenter = Augmenter(settings, model=model, log=log)
        out = augment(train, augmenter, progress=False, log=log)
        folder = str(augmented_folder(train, augmenter) / "dataset")
    folder = share(folder)
    out = out if out is not None else datasets.load_from_disk(folder)
    log(f"augmented data: {len(train)} training examples and {len(out) - len(train)} copies ({len(out)} in all) for "
        f"the stages that read augmented data")
    return out


def task_splits(d: DataSettings, log, data=None):
    """Train, dev and test data: --dev/--test when given, else the task's own splits (a task name's, a folder's
    <split> files, a DatasetDict's); with no dev split a fixed slice of train is held out for model selection,
    so the test split stays unseen. ``data``: a Dataset/DatasetDict given in code in place of --task. Returns
    (train, dev, test, label names)."""
    splits = has_splits(d.task if data is None else data)
    train = _load(d, d.task, "train", data=data)
    if "label" not in train.column_names:
        seen = source_columns(d.task if data is None else data)
        raise ValueError(
            f"--task: found no label column in {d.task}"
            + (f": its columns are {', '.join(seen)}, none named {'/'.join(LABEL_COLUMNS)}. Name the label "
               f"column with --label-column (and the text column with --text-column)" if seen else "")
            + "; task mode needs labelled data (use --mode general for unlabelled text)")
    regression = is_regression(train)
    train_names = label_names(train) if d.task not in TASKS else None
    dev = test = None
    if d.dev:
        dev = _load(d, d.dev, "dev", names=train_names)
    elif splits:
        with contextlib.suppress(DataNotFoundError):  # AG News ships train/test only
            dev = _load(d, d.task, "dev", names=train_names, data=data)
    if dev is None and len(train) >= 2:
        held = train.train_test_split(test_size=max(1, min(1000, len(train) // 10)), seed=0)
        train, dev = held["train"], held["test"]
        log(f"data: no dev split for {d.task} (pass --dev to name one); holding out {len(dev)} train examples as "
            f"dev")
    if d.test:
        test = _load(d, d.test, "test", names=train_names)
    elif d.task in TASKS:
        test = _load(d, d.task, "test")  # a named task's test split must exist
    elif splits:
        try:
            test = _load(d, d.task, "test", names=train_names, data=data)
        except DataNotFoundError:
            log(f"data: no test split in {d.task} (pass --test to name one); the report gives no test accuracy")
    if regression:
        log(f"data: {d.task}'s labels are real numbers: a regression task (one output; MSE prediction losses; "
            f"evaluated by Pearson and Spearman)")
        dev, test = _as_regression("dev", d.dev or d.task, dev), _as_regression("test", d.test or d.task, test)
        return train, dev, test, list(REGRESSION_LABELS)
    names = list(TASKS[d.task].labels) if d.task in TASKS else label_names(train)
    n_labels = len(names) if names else int(max(train["label"])) + 1
    names = names or [str(i) for i in range(n_labels)]
    _check_labels(train, {"dev": (d.dev or d.task, dev), "test": (d.test or d.task, test)}, names, d.task)
    _check_class_ids({"train": train, "dev": dev, "test": test}, names, n_labels)
    return train, dev, test, names


def load_run_data(d: DataSettings, tokenizer, *, on_cpu: bool, needs_general: bool, finetunes: bool,
                  log, task_data=None, augment_with=None, main: bool = True, share=lambda v: v) -> RunData:
    """Every split the recipe's stages read, tokenised (``finetunes``: the teacher has no head, so
    --finetune-examples selects its fine-tune data; ``task_data``: a Dataset/DatasetDict in place of --task;
    ``augment_with``: the model whose embeddings augment the training data (``d.augment``), for the stages that
    read augmented data; ``main``: this is rank 0, the one that augments; ``share``: rank 0's value on every
    rank)."""
    n_train, n_dev, note = cpu_profile(d, on_cpu)
    out = RunData(subset_note=note)
    if note:
        log(note)
    data = out.splits
    if d.mode == "task":
        train, dev, test, out.label_names = task_splits(d, log, task_data)
        if d.finetune_examples is not None and finetunes:  # only a fine-tune reads it
            data["finetune"] = tokenize(subset(train, d.finetune_examples or None, d.finetune_seed), tokenizer,
                                        d.max_length)
            log(f"teacher fine-tune data: {len(data['finetune'])} training examples "
                f"(--finetune-examples {d.finetune_examples})")
        train = subset(train, n_train, d.seed)
        dev = subset(dev, n_dev, d.seed) if dev is not None else None
        data["task"] = tokenize(train, tokenizer, d.max_length)
        if augment_with is not None:
            data["augmented"] = tokenize(augmented(train, d.augment, augment_with, main=main, share=share, log=log),
                                         tokenizer, d.max_length)
        data["dev"] = tokenize(dev, tokenizer, d.max_length) if dev is not None else None
        data["test"] = tokenize(test, tokenizer, d.max_length) if test is not None else None
    if needs_general or d.mode == "general":
        # --mode general distils on --general-corpus (default: the --task's training texts, labels dropped);
        # ERNIE-Tiny's general stages in task mode default to AG News.
        corpus = d.general_corpus or (d.task if d.mode == "general" else "agnews")
        gen = subset(_load(d, corpus, "train", general=True, data=task_data), n_train, d.seed + 1)
        gen = gen.remove_columns([c for c in gen.column_names if c != "text"])
        data["general"] = tokenize(gen, tokenizer, d.max_length)
    return out
