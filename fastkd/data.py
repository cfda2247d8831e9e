"""Where fastkd finds its data: a local data directory first, the Hugging Face hub as the online fallback.

The data directory is ``FASTKD_DATA_DIR`` (in this repository's scripts it defaults to ``../shared/data``).
Tasks are read with the ``datasets`` library; layout per task: ``<data_dir>/<task>/{train,dev,test}.tsv``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class TaskSpec:
    name: str
    text_column: str
    label_column: str
    labels: tuple[str, ...]  # label names in id order
    header: bool  # does the TSV have a header line
    hub: tuple[str, ...]  # the hub dataset (path, config) used when no local copy exists
    hub_splits: tuple[tuple[str, str], ...]  # fastkd split -> hub split
    text_pair_column: str | None = None  # the second text of sentence-pair tasks


TASKS: dict[str, TaskSpec] = {
    "sst2": TaskSpec("sst2", "sentence", "label", ("negative", "positive"), True, ("glue", "sst2"),
                     (("train", "train"), ("dev", "validation"), ("test", "validation"))),
    "agnews": TaskSpec("agnews", "text", "label", ("World", "Sports", "Business", "Sci/Tech"), False,
                       ("ag_news",), (("train", "train"), ("dev", "test"), ("test", "test"))),
}
# GLUE's sentence-pair classification tasks: locally <data_dir>/<task>/<split>.tsv with a header naming the hub's
# columns (e.g. sentence1, sentence2, label); else the hub. GLUE's test labels are hidden, so "test" is its
# validation set as for SST-2 (MNLI: dev = matched, test = mismatched).
_GLUE = (("train", "train"), ("dev", "validation"), ("test", "validation"))
for _name, _a, _b, _labels in (
    ("mrpc", "sentence1", "sentence2", ("not_equivalent", "equivalent")),
    ("rte", "sentence1", "sentence2", ("entailment", "not_entailment")),
    ("qnli", "question", "sentence", ("entailment", "not_entailment")),
    ("qqp", "question1", "question2", ("not_duplicate", "duplicate")),
    ("mnli", "premise", "hypothesis", ("entailment", "neutral", "contradiction")),
):
    _splits = (("train", "train"), ("dev", "validation_matched"), ("test", "validation_mismatched")) \
        if _name == "mnli" else _GLUE
    TASKS[_name] = TaskSpec(_name, _a, "label", _labels, True, ("glue", _name), _splits, text_pair_column=_b)


class DataNotFoundError(FileNotFoundError):
    pass


def data_dir() -> Path | None:
    """The data directory from FASTKD_DATA_DIR, or None when unset."""
    env = os.environ.get("FASTKD_DATA_DIR")
    return Path(env).expanduser() if env else None


def offline() -> bool:
    return any(os.environ.get(v, "") in ("1", "true", "True") for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE",
                                                                          "FASTKD_OFFLINE"))


def task_file(task: str, split: str) -> Path:
    """Path of a task split in the data directory; raises DataNotFoundError naming every path tried."""
    spec = TASKS.get(task)
    if spec is None:
        raise ValueError(f"task: expected one of {sorted(TASKS)}, got {task!r}")
    root = data_dir()
    tried = []
    for base in ([root] if root else []) + [Path.cwd() / "data"]:
        p = base / task / f"{split}.tsv"
        tried.append(str(p))
        if p.is_file():
            return p
    raise DataNotFoundError(
        f"data: no {task} {split} split found. Tried: {', '.join(tried)}. Provide "
        f"<dir>/{task}/{split}.tsv (tab-separated, columns "
        f"{'<TAB>'.join(c for c in (spec.text_column, spec.text_pair_column, spec.label_column) if c)}"
        f"{', with a header line' if spec.header else ', no header'}) and set FASTKD_DATA_DIR=<dir>"
        + ("" if offline() else f", or run online to fetch {'/'.join(spec.hub)} from the Hugging Face hub")
        + "."
    )


def load_task(task: str, split: str):
    """A ``datasets.Dataset`` with columns ``text`` (str), ``text_pair`` (str, sentence-pair tasks only) and
    ``label`` (int, ids in ``TASKS[task].labels`` order), from the data directory, else from the hub when online."""
    import csv

    import datasets

    spec = TASKS.get(task)
    if spec is None:
        raise ValueError(f"task: expected one of {sorted(TASKS)}, got {task!r}")
    try:
        path = task_file(task, split)
    except DataNotFoundError:
        if offline():
            raise
        hub_split = dict(spec.hub_splits)[split]
        try:
            ds = datasets.load_dataset(*spec.hub, split=hub_split)
        except Exception as e:  # no network, unknown split, ...
            raise DataNotFoundError(f"data: {task} {split} is neither local nor "
                                    f"reachable on the hub ({e}). Set FASTKD_DATA_DIR.") from e
        ds = ds.rename_column(spec.text_column, "text") if spec.text_column != "text" else ds
        if spec.text_pair_column:
            return ds.rename_column(spec.text_pair_column, "text_pair").select_columns(["text", "text_pair", "label"])
        return ds.select_columns(["text", "label"])
    names = None if spec.header else [spec.text_column, spec.label_column]
    ds = datasets.load_dataset(
        "csv", data_files=str(path), delimiter="\t", column_names=names, quoting=csv.QUOTE_NONE,
        split="train", keep_default_na=False,
    )
    label_ids = {name: i for i, name in enumerate(spec.labels)}

    def to_example(ex):
        raw = str(ex[spec.label_column]).strip()
        label = label_ids[raw] if raw in label_ids else int(raw)
        if spec.text_pair_column:
            return {"text": str(ex[spec.text_column]), "text_pair": str(ex[spec.text_pair_column]), "label": label}
        return {"text": str(ex[spec.text_column]), "label": label}

    ds = ds.map(to_example, remove_columns=ds.column_names)
    return ds.cast_column("label", datasets.Value("int64"))


# ---------------------------------------------------------------------------------------------------------------
# Any text source: task names, local TSV/CSV/JSON/JSONL files or folders of them, plain-text corpora.
# ---------------------------------------------------------------------------------------------------------------

TEXT_COLUMNS = ("text", "sentence", "content", "review", "document")  # tried in this order
LABEL_COLUMNS = ("label", "labels", "class", "category", "target")
# Sentence pairs found by name (the GLUE/SuperGLUE and common hub spellings), tried in this order.
PAIR_COLUMNS = (("sentence1", "sentence2"), ("question1", "question2"), ("premise", "hypothesis"),
                ("question", "sentence"), ("text_a", "text_b"), ("text", "text_pair"))
_TABLE_SUFFIXES = (".tsv", ".csv", ".json", ".jsonl")
_TEXT_SUFFIXES = (".txt", ".text")
LAYOUT_HELP = (
    "Provide a task name (" + ", ".join(sorted(TASKS)) + ") with FASTKD_DATA_DIR set, a .tsv/.csv file (a header "
    "line naming a text column 'text' or 'sentence' and optionally a 'label' column, or columns named by "
    "text_column / label_column, on the command line --text-column / --label-column; a two-column file without a "
    "header is read as text, label; sentence pairs as two columns such as sentence1/sentence2 or premise/"
    "hypothesis, or named by text_pair_column / --text-pair-column), a .json/.jsonl file of records with those "
    "keys, a plain-text file (one text per line, no labels), or a folder holding <split>.tsv/.csv/.json/.jsonl/.txt"
)


def label_names(ds) -> list[str] | None:
    """The label names of a dataset from :func:`load_texts` (id order), or None when it has no named labels."""
    import datasets

    feature = ds.features.get("label") if hasattr(ds, "features") else None
    return list(feature.names) if isinstance(feature, datasets.ClassLabel) else None


def has_splits(source: str) -> bool:
    """Does ``source`` have splits of its own (a task name, or a folder of ``<split>.<ext>`` files, also relative to
    the data directory) rather than being one file?"""
    if source in TASKS:
        return True
    p = Path(source).expanduser()
    if p.exists():
        return p.is_dir()
    root = data_dir()
    return root is not None and not p.is_absolute() and (root / p).is_dir()


def _resolve_source(source: str, split: str) -> tuple[Path, list[str]]:
    """The file for ``source`` (a file, or a folder holding ``<split>.<ext>``) and every path tried."""
    p = Path(source).expanduser()
    if p.is_file():
        return p, [str(p)]
    if p.is_dir():
        tried = [str(p / f"{split}{ext}") for ext in _TABLE_SUFFIXES + _TEXT_SUFFIXES]
        for candidate in tried:
            if Path(candidate).is_file():
                return Path(candidate), tried
        raise DataNotFoundError(f"data: no {split} split in folder {p}. Tried: {', '.join(tried)}. {LAYOUT_HELP}.")
    tried = [str(p)]
    root = data_dir()
    if root is not None and not p.is_absolute():  # a relative path may be meant inside the data directory
        q = root / p
        tried.append(str(q))
        if q.is_file():
            return q, tried
        if q.is_dir():
            return _resolve_source(str(q), split)
    raise DataNotFoundError(
        f"data: {source!r} is neither a task ({', '.join(sorted(TASKS))}) nor an existing file or folder. "
        f"Tried: {', '.join(tried)}. {LAYOUT_HELP}."
    )


def _sniff_header(path: Path, delimiter: str, names: tuple[str, ...] = ()) -> tuple[bool, list[str]]:
    """(has a header line, the first line's fields) from a delimited file: a header names a known column or one
    of ``names`` (the columns the caller asked for)."""
    import csv

    with open(path, encoding="utf-8", newline="") as f:
        first = f.readline()
    if not first.strip():
        raise ValueError(f"source: {path} is empty or starts with an empty line; expected a header or a record")
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    fields = next(csv.reader([first], delimiter=delimiter, quoting=quoting))
    known = {c.lower() for c in TEXT_COLUMNS + LABEL_COLUMNS + sum(PAIR_COLUMNS, ()) + tuple(names)}
    return any(f.strip().lower() in known for f in fields), fields


def _check_text_file(path: Path) -> int:
    """The number of non-empty lines of a UTF-8 text file; bytes that are not UTF-8 are refused naming the file,
    the line and what to do (the codec's own error named no file)."""
    count = 0
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"source: {path} is not UTF-8 text (line {number}, byte {e.start + 1}: {e.reason}); "
                                 f"re-save it as UTF-8") from None
            count += bool(line.strip())
    return count


def _load_table(path: Path, names: tuple[str, ...] = ()):
    """Read a TSV/CSV/JSON/JSONL file with ``datasets``; every column kept as written. ``names``: column names the
    caller expects, which mark the first line as a header."""
    import csv

    import datasets

    suffix = path.suffix.lower()
    records = _check_text_file(path)
    if suffix in (".json", ".jsonl"):
        if not records:
            raise ValueError(f"source: {path} holds no records")
        return datasets.load_dataset("json", data_files=str(path), split="train")
    delimiter = "\t" if suffix == ".tsv" else ","
    header, first = _sniff_header(path, delimiter, names)
    if header and records < 2:  # datasets' own message: 'Instruction "train" corresponds to no data!'
        raise ValueError(f"source: {path} holds a header line ({', '.join(first)}) but no records; add the data rows")
    n_columns = len(first)
    if header:
        names = None
    elif n_columns == 1:
        names = ["text"]
    elif n_columns == 2:
        names = ["text", "label"]  # the common headerless layout (AG News): text, then label
    else:
        names = [f"column{i}" for i in range(n_columns)]
    kwargs = dict(quoting=csv.QUOTE_NONE) if delimiter == "\t" else {}
    # Read every column as a string: pandas' type guessing would make "1"/"2" labels ints in one file and strings in
    # another, and turn a numeric text column into floats; labels are converted by load_texts.
    columns = [c.strip() for c in first] if header else names
    features = datasets.Features({c: datasets.Value("string") for c in columns})
    return datasets.load_dataset("csv", data_files=str(path), delimiter=delimiter, column_names=names, split="train",
                                 keep_default_na=False, features=features, **kwargs)


def _named_column(ds, name: str, argument: str, path: Path) -> str:
    """The column of ``ds`` called ``name`` (exact, else the one match ignoring case)."""
    if name in ds.column_names:
        return name
    matches = [c for c in ds.column_names if c.lower() == name.lower()]
    if len(matches) == 1:
        return matches[0]
    columns = ds.column_names
    if path.suffix.lower() in (".tsv", ".csv"):  # show the header as written, not the names a headerless read gave
        columns = [c.strip() for c in _sniff_header(path, "\t" if path.suffix.lower() == ".tsv" else ",")[1]]
    raise ValueError(f"{argument}: {path} has no column {name!r}; its columns are {columns}")


def _pick_text_column(ds) -> str:
    import datasets

    lower = {c.lower(): c for c in ds.column_names}
    for name in TEXT_COLUMNS:
        if name in lower:
            return lower[name]
    for c, feature in ds.features.items():
        if isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string") and \
                c.lower() not in LABEL_COLUMNS:
            return c
    raise ValueError(f"source: no text column found among {ds.column_names}; expected one named "
                     f"{' or '.join(TEXT_COLUMNS[:2])}, or any string column")


def _pick_label_column(ds, text_column: str) -> str | None:
    lower = {c.lower(): c for c in ds.column_names if c != text_column}
    for name in LABEL_COLUMNS:
        if name in lower:
            return lower[name]
    return None


def _label_mapping(values: list, order: str, names: list[str] | None) -> tuple[dict[str, int] | None, list[str] | None]:
    """(name -> id mapping or None when the labels are already ints, the label names or None)."""
    if names is not None:
        return {str(n): i for i, n in enumerate(names)}, [str(n) for n in names]
    as_text = [str(v).strip() for v in values]
    if all(_is_int(v) for v in as_text):
        return None, None
    if order == "sorted":
        ordered = sorted(set(as_text))
    else:
        ordered = list(dict.fromkeys(as_text))
    return {n: i for i, n in enumerate(ordered)}, ordered


def _refuse_empty_labels(values: list, path: Path, column: str) -> None:
    """An empty label became a class of its own and shifted every id (test accuracy 0 with exit 0)."""
    empty = [i + 1 for i, v in enumerate(values) if v is None or not str(v).strip()]
    if empty:
        raise ValueError(f"{path}: {len(empty)} row(s) have no label (data rows {empty[:8]}"
                         f"{' ...' if len(empty) > 8 else ''}, 1-based, in column {column!r}); give them a label or "
                         f"remove them")


def _is_int(s: str) -> bool:
    return s.lstrip("-").isdigit()


def load_texts(source: str, split: str = "train", *, label_order: str = "sorted",
               label_names: list[str] | tuple[str, ...] | None = None, text_column: str | None = None,
               label_column: str | None = None, text_pair_column: str | None = None):
    """A ``datasets.Dataset`` with a ``text`` column and, when the source has labels, an int ``label`` column.

    ``source`` is a task name in :data:`TASKS` (read by :func:`load_task`), a .tsv/.csv/.json/.jsonl file, a
    plain-text file (one text per line, empty lines skipped, no labels), or a folder holding ``<split>.<ext>``.
    The text column is "text", else "sentence" (any case), else the first string column. Integer labels are kept;
    label names are mapped to ids in ``label_order`` ("sorted", the default, so that every split of a data set gets
    the same ids, or "first_seen"), or by the given ``label_names``; the names are then exposed as a
    ``datasets.ClassLabel`` (:func:`label_names` reads them back). Missing data raises :class:`DataNotFoundError`
    naming every path tried and the layout to provide. ``text_column`` / ``label_column`` name a table file's
    columns when they are not among the names tried (:data:`TEXT_COLUMNS`, :data:`LABEL_COLUMNS`); a task name's
    columns are fixed, so they do not apply to it. Sentence pairs: a file with two columns of :data:`PAIR_COLUMNS`
    (sentence1/sentence2, premise/hypothesis, ...), or ``text_pair_column`` naming the second text, gives a
    ``text_pair`` column beside ``text``.
    """
    import datasets

    if not isinstance(source, (str, os.PathLike)):
        raise ValueError(f"source: expected a task name or a path, got {type(source).__name__}")
    if label_order not in ("sorted", "first_seen"):
        raise ValueError(f"label_order: expected 'sorted' or 'first_seen', got {label_order!r}")
    source = str(source)
    if source in TASKS:
        ds = load_task(source, split)
        names = list(label_names) if label_names is not None else list(TASKS[source].labels)
        return ds.cast_column("label", datasets.ClassLabel(names=names))
    path, _ = _resolve_source(source, split)
    if path.suffix.lower() not in _TABLE_SUFFIXES:  # a plain-text corpus
        if not _check_text_file(path):
            raise ValueError(f"source: {path} holds no text (every line is empty)")
        ds = datasets.load_dataset("text", data_files=str(path), split="train")
        return ds.filter(lambda ex: bool(ex["text"].strip()))
    ds = _load_table(path, tuple(c for c in (text_column, label_column, text_pair_column) if c))
    if len(ds) == 0:
        raise ValueError(f"source: {path} holds no records")
    if text_pair_column:
        text_pair_column = _named_column(ds, text_pair_column, "text_pair_column", path)
    elif not text_column:
        lower = {c.lower(): c for c in ds.column_names}
        pair = next((p for p in PAIR_COLUMNS if p[0] in lower and p[1] in lower), None)
        if pair is not None:
            text_column, text_pair_column = lower[pair[0]], lower[pair[1]]
    text_column = _named_column(ds, text_column, "text_column", path) if text_column else \
        _pick_text_column(ds.remove_columns([text_pair_column]) if text_pair_column else ds)
    if text_column == text_pair_column:
        raise ValueError(f"text_pair_column: the second text must be another column than the first ({text_column!r})")
    label_column = (_named_column(ds, label_column, "label_column", path) if label_column
                    else _pick_label_column(ds, text_column))
    texts = {"text": text_column, "text_pair": text_pair_column} if text_pair_column else {"text": text_column}
    if label_column is None:  # no per-row work: select and rename the text columns
        ds = ds.select_columns(list(texts.values()))
        return ds.rename_columns({c: k for k, c in texts.items() if c != k})
    raw_labels = ds[label_column]
    _refuse_empty_labels(raw_labels, path, label_column)
    mapping, names = _label_mapping(raw_labels, label_order, list(label_names) if label_names else None)

    def to_example(ex):
        raw = str(ex[label_column]).strip()
        out = {k: str(ex[c]) for k, c in texts.items()}
        if mapping is None:
            return {**out, "label": int(raw)}
        if raw not in mapping:
            raise ValueError(f"label_names: label {raw!r} in {path} is not one of {names} (for a dev/test file: the "
                             f"training data's labels; every dev/test label must occur in the training data)")
        return {**out, "label": mapping[raw]}

    ds = ds.map(to_example, remove_columns=ds.column_names)
    feature = datasets.ClassLabel(names=names) if names is not None else datasets.Value("int64")
    return ds.cast_column("label", feature).select_columns([*texts, "label"])


def tokenize(ds, tokenizer, max_length: int, *, batch_size: int = 1000, num_proc: int | None = None):
    """Add ``input_ids`` (list[int], special tokens included, truncated to ``max_length``, no padding), ``length``
    (int) and ``index`` (the row number: the example's key for the sampler and the teacher cache); every existing
    column (``text``, ``label``) is kept. With a ``text_pair`` column the two texts are encoded as one pair
    (truncated longest-first) and, when the tokenizer has segment ids (BERT; RoBERTa has none), ``type_start``
    records where the second segment begins."""
    if not isinstance(max_length, int) or isinstance(max_length, bool) or max_length < 2:
        raise ValueError(f"max_length: expected an int >= 2 (room for [CLS] and [SEP]), got {max_length!r}")
    if "text" not in ds.column_names:
        raise ValueError(f"ds: expected a 'text' column, got columns {ds.column_names}")

    pairs = "text_pair" in ds.column_names
    segments = pairs and "token_type_ids" in tokenizer.model_input_names

    def encode(batch, indices):
        enc = tokenizer(batch["text"], batch["text_pair"] if pairs else None, truncation=True,
                        max_length=max_length, padding=False, return_attention_mask=False,
                        return_token_type_ids=segments)
        ids = enc["input_ids"]
        out = {"input_ids": ids, "length": [len(x) for x in ids], "index": list(indices)}
        if segments:
            out["type_start"] = [t.index(1) if 1 in t else len(t) for t in enc["token_type_ids"]]
        return out

    return ds.map(encode, batched=True, batch_size=batch_size, with_indices=True,
                  num_proc=num_proc, desc=None)
