"""Where fastkd finds its data: a local data directory first, the Hugging Face hub as the online fallback.

The data directory is ``FASTKD_DATA_DIR`` (in this repository's scripts it defaults to ``../shared/data``).
Tasks are read with the ``datasets`` library; layout per task: ``<data_dir>/<task>/{train,dev,test}.tsv``.
"""

from __future__ import annotations

import functools
import math
import os
import re
import socket
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


@functools.lru_cache(maxsize=1)
def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub (``HF_ENDPOINT``) answers a TCP connection, asked once per process: on a
    machine without network, datasets' own retries took 80 s before an error that named no local path."""
    from urllib.parse import urlparse

    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout).close()
    except OSError:
        return False
    return True


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
    except DataNotFoundError as e:
        if offline():
            raise
        if not hub_reachable():
            raise DataNotFoundError(f"{e} (The hub is not reachable from this machine, so nothing was downloaded.)"
                                    ) from None
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
LABEL_COLUMNS = ("label", "labels", "class", "category", "target", "score")
# Sentence pairs found by name (the GLUE/SuperGLUE and common hub spellings), tried in this order.
PAIR_COLUMNS = (("sentence1", "sentence2"), ("question1", "question2"), ("premise", "hypothesis"),
                ("question", "sentence"), ("text_a", "text_b"), ("text", "text_pair"))
_TABLE_SUFFIXES = (".tsv", ".csv", ".json", ".jsonl", ".parquet")
# A folder's or a DatasetDict's name for each split, tried in this order.
SPLIT_NAMES = {"train": ("train",), "dev": ("dev", "validation", "valid", "validation_matched"),
               "test": ("test", "validation_mismatched")}
_TEXT_SUFFIXES = (".txt", ".text")
LAYOUT_HELP = (
    "Provide a task name (" + ", ".join(sorted(TASKS)) + ") with FASTKD_DATA_DIR set, a .tsv/.csv file (a header "
    "line naming a text column 'text' or 'sentence' and optionally a 'label' column, or columns named by "
    "text_column / label_column, on the command line --text-column / --label-column; a two-column file without a "
    "header is read as text, label; sentence pairs as two columns such as sentence1/sentence2 or premise/"
    "hypothesis, or named by text_pair_column / --text-pair-column), a .json/.jsonl/.parquet file of records with "
    "those keys, a plain-text file (one text per line, no labels), a folder holding "
    "<split>.tsv/.csv/.json/.jsonl/.parquet/.txt (or <split>-*.parquet shards), a datasets save_to_disk folder, or "
    "a hub dataset name (online)"
)


def label_names(ds) -> list[str] | None:
    """The label names of a dataset from :func:`load_texts` (id order), or None when it has no named labels."""
    import datasets

    feature = ds.features.get("label") if hasattr(ds, "features") else None
    return list(feature.names) if isinstance(feature, datasets.ClassLabel) else None


def has_splits(source) -> bool:
    """Does ``source`` have splits of its own (a task name, a DatasetDict or a hub name, or a folder of
    ``<split>.<ext>`` files or a saved DatasetDict, also relative to the data directory) rather than being one
    file or Dataset?"""
    import datasets

    if isinstance(source, (datasets.Dataset, datasets.DatasetDict)):
        return isinstance(source, datasets.DatasetDict)
    source = str(source)
    if source in TASKS or is_hub_name(source):
        return True
    p = Path(source).expanduser()
    root = data_dir()
    if not p.exists() and root is not None and not p.is_absolute():
        p = root / p
    return p.is_dir() and not (p / "state.json").is_file()  # a saved single Dataset is one split


def _resolve_source(source: str, split: str) -> tuple[Path, list[str]]:
    """The file for ``source`` (a file, or a folder holding ``<split>.<ext>``) and every path tried."""
    p = Path(source).expanduser()
    if p.is_file():
        return p, [str(p)]
    if p.is_dir():
        if is_saved_dataset(p):
            return p, [str(p)]
        names = SPLIT_NAMES.get(split, (split,))
        tried = [str(p / f"{name}{ext}") for name in names for ext in _TABLE_SUFFIXES + _TEXT_SUFFIXES]
        for candidate in tried:
            if Path(candidate).is_file():
                return Path(candidate), tried
        for pattern in (f"{name}-*.parquet" for name in names):  # a hub repository's shards, in data/ or not
            for folder in (p, p / "data"):
                tried.append(str(folder / pattern))
                if any(folder.glob(pattern)):
                    return folder / pattern, tried
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
    import itertools

    with open(path, encoding="utf-8", newline="") as f:
        first = f.readline()
    if not first.strip():
        raise ValueError(f"source: {path} is empty or starts with an empty line; expected a header or a record")
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    fields = next(csv.reader([first], delimiter=delimiter, quoting=quoting))
    known = {c.lower() for c in TEXT_COLUMNS + LABEL_COLUMNS + sum(PAIR_COLUMNS, ()) + tuple(names)}
    if any(f.strip().lower() in known for f in fields):
        return True, fields
    # Columns of unknown names ("id,utterance,y"): a header all the same when a column is numeric in every row
    # below it but not in the first (reading that line as a record made "id" a text and the ids the texts).
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(itertools.islice(csv.reader(f, delimiter=delimiter, quoting=quoting), 1, 21))
    numeric = [all(len(r) == len(fields) and _is_number(r[i]) for r in rows) for i in range(len(fields))]
    return bool(rows) and any(n and not _is_number(f) for n, f in zip(numeric, fields, strict=True)), fields


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
    """Read a TSV/CSV/JSON/JSONL/Parquet file (or a glob of Parquet shards) with ``datasets``; every column kept as
    written. ``names``: column names the caller expects, which mark the first line as a header."""
    import csv

    import datasets

    suffix = path.suffix.lower()
    if suffix == ".parquet":  # binary: never read as text (it was, and failed with a UnicodeDecodeError)
        return datasets.load_dataset("parquet", data_files=str(path), split="train")
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


def _named_column(ds, name: str, argument: str, where: str, path: Path | None = None) -> str:
    """The column of ``ds`` called ``name`` (exact, else the one match ignoring case)."""
    if name in ds.column_names:
        return name
    matches = [c for c in ds.column_names if c.lower() == name.lower()]
    if len(matches) == 1:
        return matches[0]
    columns = ds.column_names
    if path is not None and path.suffix.lower() in (".tsv", ".csv"):
        # show the header as written, not the names a headerless read gave
        columns = [c.strip() for c in _sniff_header(path, "\t" if path.suffix.lower() == ".tsv" else ",")[1]]
    raise ValueError(f"{argument}: {where} has no column {name!r}; its columns are {columns}")


def _pick_text_column(ds) -> str:
    import datasets

    lower = {c.lower(): c for c in ds.column_names}
    for name in TEXT_COLUMNS:
        if name in lower:
            return lower[name]
    strings = [c for c, feature in ds.features.items() if isinstance(feature, datasets.Value)
               and feature.dtype in ("string", "large_string") and c.lower() not in LABEL_COLUMNS]
    sample = ds.select(range(min(len(ds), 100)))
    for c in strings:  # a CSV's columns are all read as strings: an id or a number column is not the text
        if not all(_is_number(str(v)) for v in sample[c]):
            return c
    if strings:
        return strings[0]
    raise ValueError(f"source: no text column found among {ds.column_names}; expected one named "
                     f"{' or '.join(TEXT_COLUMNS[:2])}, or any string column")


def source_columns(source, split: str = "train") -> list[str]:
    """The columns a table or dataset source holds as written, before load_texts picks and renames them (for
    the messages that must name them); [] for a task name, a plain-text file or a hub name."""
    import datasets

    if isinstance(source, (datasets.Dataset, datasets.DatasetDict)):
        return list(pick_split(source, split, "source").column_names)
    if str(source) in TASKS or is_hub_name(str(source)):
        return []
    path, _ = _resolve_source(str(source), split)
    if is_saved_dataset(path):
        return list(pick_split(datasets.load_from_disk(str(path)), split, str(path)).column_names)
    return list(_load_table(path).column_names) if path.suffix.lower() in _TABLE_SUFFIXES else []


def _pick_label_column(ds, text_column: str) -> str | None:
    lower = {c.lower(): c for c in ds.column_names if c != text_column}
    for name in LABEL_COLUMNS:
        if name in lower:
            return lower[name]
    return None


def _is_number(s: str) -> bool:
    try:
        return math.isfinite(float(s))
    except ValueError:
        return False


def _label_mapping(values: list, order: str, names: list[str] | None, feature=None
                   ) -> tuple[str, dict[str, int] | None, list[str] | None]:
    """(kind, name -> id mapping, label names): kind "int" (ids as written), "float" (regression: real numbers,
    or a float column; they once became one class per distinct value) or "names" (mapped to ids)."""
    if names is not None:
        return "names", {str(n): i for i, n in enumerate(names)}, [str(n) for n in names]
    as_text = [str(v).strip() for v in values]
    bad = [i + 1 for i, v in enumerate(as_text) if v.lower().lstrip("+-") in ("nan", "inf", "infinity")]
    if bad:  # NaN/inf targets would train a NaN student, or become classes named "nan"
        raise ValueError(f"label: {len(bad)} row(s) have a NaN/inf label (data rows {bad[:8]}, 1-based); fix or "
                         f"remove them")
    if getattr(feature, "dtype", "").startswith("float") and all(_is_number(v) for v in as_text):
        return "float", None, None
    if all(_is_int(v) for v in as_text):
        return "int", None, None
    if all(_is_number(v) for v in as_text):
        return "float", None, None
    if order == "sorted":
        ordered = sorted(set(as_text))
    else:
        ordered = list(dict.fromkeys(as_text))
    return "names", {n: i for i, n in enumerate(ordered)}, ordered


def _refuse_empty_labels(values: list, path, column: str) -> None:
    """An empty label became a class of its own and shifted every id (test accuracy 0 with exit 0)."""
    empty = [i + 1 for i, v in enumerate(values) if v is None or not str(v).strip()]
    if empty:
        raise ValueError(f"{path}: {len(empty)} row(s) have no label (data rows {empty[:8]}"
                         f"{' ...' if len(empty) > 8 else ''}, 1-based, in column {column!r}); give them a label or "
                         f"remove them")


def _is_int(s: str) -> bool:
    return s.lstrip("-").isdigit()


def load_texts(source, split: str = "train", *, label_order: str = "sorted",
               label_names: list[str] | tuple[str, ...] | None = None, text_column: str | None = None,
               label_column: str | None = None, text_pair_column: str | None = None):
    """A ``datasets.Dataset`` with a ``text`` column and, when the source has labels, a ``label`` column: int
    class ids, or float32 values for a regression task (labels written as real numbers, or a float column).

    ``source`` is a task name in :data:`TASKS` (read by :func:`load_task`); a .tsv/.csv/.json/.jsonl/.parquet
    file; a plain-text file (one text per line, empty lines skipped, no labels); a folder holding
    ``<split>.<ext>`` (Parquet also as ``<split>-*.parquet`` shards, as hub repositories store them); a
    ``save_to_disk`` folder; a ``datasets.Dataset`` or ``DatasetDict``; or a hub dataset name
    (``stanfordnlp/sst2``, fetched with ``datasets.load_dataset``; refused offline, naming the name). A
    DatasetDict's dev split is ``validation`` (or ``dev``/``valid``). The text column is "text", else "sentence"
    (any case), else the first string column. Integer labels are kept (a ClassLabel's names with them); label
    names are mapped to ids in ``label_order`` ("sorted", the default, so that every split of a data set gets
    the same ids, or "first_seen"), or by the given ``label_names``; the names are then exposed as a
    ``datasets.ClassLabel`` (:func:`label_names` reads them back). Missing data raises :class:`DataNotFoundError`
    naming every path tried and the layout to provide. ``text_column`` / ``label_column`` name a table's columns
    when they are not among the names tried (:data:`TEXT_COLUMNS`, :data:`LABEL_COLUMNS`); a task name's columns
    are fixed, so they do not apply to it. Sentence pairs: two columns of :data:`PAIR_COLUMNS`
    (sentence1/sentence2, premise/hypothesis, ...), or ``text_pair_column`` naming the second text, give a
    ``text_pair`` column beside ``text``.
    """
    import datasets

    if label_order not in ("sorted", "first_seen"):
        raise ValueError(f"label_order: expected 'sorted' or 'first_seen', got {label_order!r}")
    columns = dict(text_column=text_column, label_column=label_column, text_pair_column=text_pair_column)
    if isinstance(source, (datasets.Dataset, datasets.DatasetDict)):
        return _normalise(pick_split(source, split, "source"), f"the given dataset's {split} split", None,
                          label_order, label_names, **columns)
    if not isinstance(source, (str, os.PathLike)):
        raise ValueError(f"source: expected a task name, a path, a hub name or a datasets.Dataset/DatasetDict, got "
                         f"{type(source).__name__}")
    source = str(source)
    if source in TASKS:
        ds = load_task(source, split)
        names = list(label_names) if label_names is not None else list(TASKS[source].labels)
        return ds.cast_column("label", datasets.ClassLabel(names=names))
    if is_hub_name(source):
        return _normalise(pick_split(load_hub(source), split, source), f"{source}'s {split} split", None,
                          label_order, label_names, **columns)
    path, _ = _resolve_source(source, split)
    if is_saved_dataset(path):
        return _normalise(pick_split(datasets.load_from_disk(str(path)), split, str(path)),
                          f"{path} ({split} split)", None, label_order, label_names, **columns)
    if path.suffix.lower() not in _TABLE_SUFFIXES:  # a plain-text corpus
        if not _check_text_file(path):
            raise ValueError(f"source: {path} holds no text (every line is empty)")
        ds = datasets.load_dataset("text", data_files=str(path), split="train")
        return ds.filter(lambda ex: bool(ex["text"].strip()))
    ds = _load_table(path, tuple(c for c in (text_column, label_column, text_pair_column) if c))
    return _normalise(ds, str(path), path, label_order, label_names, **columns)


def _text_columns(ds, where: str, path: Path | None, text_column, text_pair_column) -> dict[str, str]:
    """{"text": column, "text_pair": column (pairs only)} of a table, found by name or given."""
    if text_pair_column:
        text_pair_column = _named_column(ds, text_pair_column, "text_pair_column", where, path)
    elif not text_column:
        lower = {c.lower(): c for c in ds.column_names}
        pair = next((p for p in PAIR_COLUMNS if p[0] in lower and p[1] in lower), None)
        if pair is not None:
            text_column, text_pair_column = lower[pair[0]], lower[pair[1]]
    text_column = _named_column(ds, text_column, "text_column", where, path) if text_column else \
        _pick_text_column(ds.remove_columns([text_pair_column]) if text_pair_column else ds)
    if text_column == text_pair_column:
        raise ValueError(f"text_pair_column: the second text must be another column than the first ({text_column!r})")
    return {"text": text_column, "text_pair": text_pair_column} if text_pair_column else {"text": text_column}


def _normalise(ds, where: str, path: Path | None, label_order: str, label_names, *, text_column=None,
               label_column=None, text_pair_column=None):
    """A table's rows as ``text`` (+ ``text_pair``) and ``label`` (class ids, or floats for regression)."""
    import datasets

    if len(ds) == 0:
        raise ValueError(f"source: {where} holds no records")
    texts = _text_columns(ds, where, path, text_column, text_pair_column)
    label_column = (_named_column(ds, label_column, "label_column", where, path) if label_column
                    else _pick_label_column(ds, texts["text"]))
    if label_column is None:  # no per-row work: select and rename the text columns
        ds = ds.select_columns(list(texts.values()))
        return ds.rename_columns({c: k for k, c in texts.items() if c != k})
    raw_labels = ds[label_column]
    _refuse_empty_labels(raw_labels, where, label_column)
    feature = ds.features.get(label_column)
    if label_names is None and isinstance(feature, datasets.ClassLabel):
        label_names = feature.names  # a ClassLabel's ids are kept with their names
        raw_labels = [feature.names[v] if 0 <= v < len(feature.names) else v for v in raw_labels]
    kind, mapping, names = _label_mapping(raw_labels, label_order, list(label_names) if label_names else None,
                                          feature)

    def to_example(ex):
        value = ex[label_column]
        if isinstance(feature, datasets.ClassLabel) and isinstance(value, int) and 0 <= value < len(feature.names):
            value = feature.names[value]
        raw = str(value).strip()
        out = {k: str(ex[c]) for k, c in texts.items()}
        if kind != "names":
            return {**out, "label": float(raw) if kind == "float" else int(raw)}
        if raw not in mapping:
            raise ValueError(f"label_names: label {raw!r} in {where} is not one of {names} (for a dev/test file: "
                             f"the training data's labels; every dev/test label must occur in the training data)")
        return {**out, "label": mapping[raw]}

    ds = ds.map(to_example, remove_columns=ds.column_names)
    if kind == "float":
        feature = datasets.Value("float32")
    else:
        feature = datasets.ClassLabel(names=names) if names is not None else datasets.Value("int64")
    return ds.cast_column("label", feature).select_columns([*texts, "label"])


def is_regression(ds) -> bool:
    """Does a dataset from :func:`load_texts` hold regression labels (real numbers)?"""
    feature = ds.features.get("label") if ds is not None and hasattr(ds, "features") else None
    return getattr(feature, "dtype", "").startswith("float")


def pick_split(source, split: str, where: str):
    """A DatasetDict's ``split`` (``dev``: validation, dev or valid), or a Dataset itself (its only split)."""
    import datasets

    if isinstance(source, datasets.Dataset):
        return source
    names = SPLIT_NAMES.get(split, (split,))
    for name in names:
        if name in source:
            return source[name]
    raise DataNotFoundError(f"data: {where} has no {split} split (looked for {', '.join(names)}; it has "
                            f"{', '.join(source)})")


def is_saved_dataset(path: Path) -> bool:
    """A ``save_to_disk`` folder (of a Dataset or a DatasetDict)?"""
    return path.is_dir() and any((path / f).is_file() for f in ("dataset_dict.json", "state.json"))


_HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


def is_hub_name(source: str) -> bool:
    """``name`` or ``owner/name`` that is no local file or folder (nor one in the data directory) and has no
    data-file suffix: what ``datasets.load_dataset`` would fetch from the hub."""
    p = Path(source).expanduser()
    root = data_dir()
    if p.exists() or (root is not None and (root / source).exists()):
        return False
    return bool(_HUB_NAME.fullmatch(source)) and p.suffix.lower() not in _TABLE_SUFFIXES + _TEXT_SUFFIXES


def load_hub(name: str):
    """A hub dataset's splits (a DatasetDict) through ``datasets.load_dataset``; offline, a clear refusal."""
    import datasets

    if offline():
        raise DataNotFoundError(
            f"data: {name!r} is not a local file or folder, and as a hub dataset it can't be fetched: the hub is "
            f"switched off here (HF_DATASETS_OFFLINE=1 or HF_HUB_OFFLINE=1). Unset HF_DATASETS_OFFLINE / "
            f"HF_HUB_OFFLINE to download it, or pass a local file or folder ({LAYOUT_HELP})")
    if not hub_reachable():
        raise DataNotFoundError(f"data: {name!r} is not a local file or folder, and as a hub dataset it can't be "
                                f"fetched: the hub is not reachable from this machine. Pass a local file or folder "
                                f"({LAYOUT_HELP})")
    try:
        return datasets.load_dataset(name)
    except Exception as e:  # noqa: BLE001 - no network, no such dataset, a config to choose, ...
        raise DataNotFoundError(f"data: could not load {name!r} from the Hugging Face hub ({type(e).__name__}: "
                                f"{e}); check the name, or pass a local file or folder") from e


def prepare_dataset(ds, tokenizer, max_length: int = 128, argument: str = "dataset"):
    """A Dataset for a Trainer: tokenised ones are kept as they are; raw ones (``text`` and ``label`` columns, as
    :func:`load_texts` reads them) are normalised and tokenised, with ``token_type_ids`` for sentence pairs."""
    import datasets

    if ds is None:
        return None
    if isinstance(ds, datasets.DatasetDict):
        ds = pick_split(ds, "train", argument)
    if not isinstance(ds, datasets.Dataset):
        raise ValueError(f"{argument}: expected a datasets.Dataset or DatasetDict, got {type(ds).__name__}")
    if "input_ids" in ds.column_names:
        return ds
    if tokenizer is None:
        raise ValueError(f"{argument}: it is not tokenised (no input_ids column), so pass processing_class (the "
                         f"tokenizer)")
    ds = tokenize(load_texts(ds), tokenizer, max_length)
    if "type_start" in ds.column_names:
        ds = ds.map(lambda ex: {"token_type_ids": [0] * ex["type_start"]
                                + [1] * (len(ex["input_ids"]) - ex["type_start"])})
    return ds.remove_columns([c for c in ds.column_names if c in ("text", "text_pair", "length", "type_start")])


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
