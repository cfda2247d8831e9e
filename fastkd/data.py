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


TASKS: dict[str, TaskSpec] = {
    "sst2": TaskSpec("sst2", "sentence", "label", ("negative", "positive"), True, ("glue", "sst2"),
                     (("train", "train"), ("dev", "validation"), ("test", "validation"))),
    "agnews": TaskSpec("agnews", "text", "label", ("World", "Sports", "Business", "Sci/Tech"), False,
                       ("ag_news",), (("train", "train"), ("dev", "test"), ("test", "test"))),
}


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
        f"<dir>/{task}/{split}.tsv (tab-separated, columns {spec.text_column}<TAB>{spec.label_column}"
        f"{', with a header line' if spec.header else ', no header'}) and set FASTKD_DATA_DIR=<dir>"
        + ("" if offline() else f", or run online to fetch {'/'.join(spec.hub)} from the Hugging Face hub")
        + "."
    )


def load_task(task: str, split: str):
    """A ``datasets.Dataset`` with columns ``text`` (str) and ``label`` (int, ids in ``TASKS[task].labels``
    order), from the data directory, else from the hub when online."""
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
        return {"text": str(ex[spec.text_column]), "label": label}

    ds = ds.map(to_example, remove_columns=ds.column_names)
    return ds.cast_column("label", datasets.Value("int64"))
