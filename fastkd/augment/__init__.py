"""TinyBERT's data augmentation: N copies of each training example, its words replaced by a masked LM's
predictions (single-piece words) or embedding neighbours (multi-piece words), each with probability p.

    from fastkd.augment import AugmentSettings, Augmenter, augment
    aug = augment(train_ds, Augmenter(AugmentSettings(copies=20), model="path/to/teacher"))

``train_ds`` has a ``text`` column (and ``text_pair`` for sentence pairs; both sides are augmented) and usually a
``label``; the result holds the original rows first, in order, then every row's copies, each with its source
row's label (carried, never predicted) and its ``source`` row number. Results are cached on disk under
``<$FASTKD_CACHE_DIR or ~/.cache/fastkd>/augmented/<key>``, keyed by the data, the models and the settings, and
written chunk by chunk, so a killed augmentation resumes where it stopped and a later run reuses it.

The default differs from the paper: TinyBERT uses BERT-base's masked LM and GloVe vectors; no fill-mask model
or GloVe file ships with fastkd's dependencies (the packaged MiniLM teacher is a sentence-embedding model without
an MLM head), so without ``mlm`` every word, single-piece or not, takes its neighbours in the teacher's input
embedding space. Name a masked LM (``mlm``) for the paper's single-piece rule, and a GloVe file (``embeddings``)
for its multi-piece one.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from fastkd.augment.sources import Neighbours, load_masked_lm, mlm_candidates
from fastkd.augment.words import draw_copies, example_rng, piece_ids, replaceable, whole_word_ids, word_spans
from fastkd.digest import data_digest, fingerprint_model, fingerprint_tokenizer, sha256_file, sha256_json

__all__ = ["AugmentSettings", "Augmenter", "augment", "augmented_folder"]

FORMAT_VERSION = 1
CHUNK_EXAMPLES = 256  # source examples per resumable part


@dataclass(frozen=True)
class AugmentSettings:
    """TinyBERT's settings (its data_augmentation.py defaults: N = 30 copies, M = 15 candidates, p = 0.4)."""

    copies: int = 30  # N: augmented copies per example (fewer where duplicates are drawn)
    candidates: int = 15  # M: candidates per word
    p: float = 0.4  # probability that a word is replaced
    mlm: str | None = None  # a fill-mask model (folder or hub name); None: embedding neighbours for every word
    embeddings: str | None = None  # a GloVe-format file for the neighbours; None: the model's input embeddings
    seed: int = 0
    batch_size: int = 64  # masked-LM queries per forward

    def __post_init__(self):
        for name, ok, expected in (
                ("copies", _is_int(self.copies) and self.copies >= 1, "a positive number of copies per example"),
                ("candidates", _is_int(self.candidates) and self.candidates >= 1, "a positive number of candidates"),
                ("p", isinstance(self.p, (int, float)) and 0 <= self.p <= 1, "a probability in [0, 1]"),
                ("seed", _is_int(self.seed) and self.seed >= 0, "an integer >= 0"),
                ("batch_size", _is_int(self.batch_size) and self.batch_size >= 1, "a positive integer")):
            if not ok:
                raise ValueError(f"{name}: expected {expected}, got {getattr(self, name)!r}")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


class Augmenter:
    """The candidate sources of one configuration: a masked LM (``settings.mlm``) or none, and the neighbours'
    space (``settings.embeddings``, else the masked LM's input embeddings, else ``model``'s: the teacher)."""

    def __init__(self, settings: AugmentSettings, *, model: str | Path | None = None,
                 device: torch.device | str | None = None, log=print):
        from transformers import AutoModel, AutoTokenizer

        self.settings, self.log = settings, log
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.mlm = None
        if settings.mlm:
            self.mlm, self.tokenizer = load_masked_lm(settings.mlm, self.device)
            source, matrix = self.mlm, None
        else:
            if model is None:
                raise ValueError("model: expected the model whose input embeddings give the neighbours (the "
                                 "teacher) when no mlm is named")
            self.tokenizer = AutoTokenizer.from_pretrained(model)
            source = AutoModel.from_pretrained(model)
        if getattr(self.tokenizer, "backend_tokenizer", None) is None:
            raise ValueError(f"model: {type(self.tokenizer).__name__} is a slow tokenizer; augmentation needs a fast "
                             f"one (tokenizer.json)")
        self.whole = whole_word_ids(self.tokenizer)
        if settings.embeddings:
            self.neighbours = Neighbours.from_glove(settings.embeddings)
            space = sha256_file(Path(settings.embeddings))
        else:
            matrix = source.get_input_embeddings().weight
            name = settings.mlm or str(model)
            self.neighbours = Neighbours.from_embeddings(matrix, self.tokenizer, self.whole, f"{name}'s input "
                                                         f"embeddings")
            space = sha256_json([list(matrix.shape), str(matrix.dtype),
                                 fingerprint_model(torch.nn.Embedding.from_pretrained(matrix.detach().cpu()))])
        self.fingerprint = sha256_json({"settings": {k: v for k, v in asdict(settings).items()
                                                     if k not in ("batch_size", "mlm", "embeddings")},
                                        "tokenizer": fingerprint_tokenizer(self.tokenizer), "space": space,
                                        "mlm": fingerprint_model(self.mlm) if self.mlm is not None else None,
                                        "version": FORMAT_VERSION})
        if self.mlm is None:
            del source  # only its embedding matrix was needed

    def describe(self) -> str:
        s = self.settings
        single = f"the masked LM {s.mlm}'s top {s.candidates}" if s.mlm else \
            f"{s.candidates} nearest neighbours in {self.neighbours.source} (no masked LM named)"
        return (f"N={s.copies} copies per example, each word replaced with p={s.p}; single-piece words: {single}; "
                f"multi-piece words: {s.candidates} nearest neighbours in {self.neighbours.source}")

    def candidates(self, texts: list[str]) -> tuple[list[list], list[dict[int, list[str]]]]:
        """Per text: its word spans and, for each replaceable word, its candidate list (the word itself where no
        candidate was found, as TinyBERT keeps it)."""
        s = self.settings
        spans = [word_spans(t) for t in texts]
        words = [[t[a:b] for a, b in sp] for t, sp in zip(texts, spans, strict=True)]
        todo = [(i, w) for i, ws in enumerate(words) for w, word in enumerate(ws) if replaceable(word)]
        single = [len(p) == 1 for p in piece_ids(self.tokenizer, [words[i][w] for i, w in todo])] \
            if self.mlm is not None else [False] * len(todo)
        found: dict[tuple[int, int], list[str]] = {}
        queries = [(i, w) for (i, w), one in zip(todo, single, strict=True) if one]
        if queries:
            got = mlm_candidates(self.mlm, self.tokenizer, [(texts[i], spans[i][w]) for i, w in queries],
                                 s.candidates, self.whole, s.batch_size, self.device)
            found.update(zip(queries, got, strict=True))
        rest = [(i, w) for (i, w), one in zip(todo, single, strict=True) if not one]
        near = self.neighbours.nearest([words[i][w] for i, w in rest], s.candidates, self.device)
        found.update(zip(rest, near, strict=True))
        cands = [{} for _ in texts]
        for (i, w), c in found.items():
            cands[i][w] = c or [words[i][w]]
        return spans, cands

    def copies_of(self, rows: list[tuple[str, ...]], first_row: int) -> list[tuple[int, tuple[str, ...]]]:
        """The augmented copies of ``rows`` (each a text, or the two texts of a pair), numbered from
        ``first_row``: (source row, texts) pairs, deterministic for the seed whatever the chunking."""
        sides = len(rows[0]) if rows else 0
        per_side = [self.candidates([r[k] for r in rows]) for k in range(sides)]
        out = []
        for j, row in enumerate(rows):
            spans = [per_side[k][0][j] for k in range(sides)]
            cands = [per_side[k][1][j] for k in range(sides)]
            rng = example_rng(self.settings.seed, first_row + j)
            out += [(first_row + j, c) for c in draw_copies(row, spans, cands, self.settings.copies,
                                                              self.settings.p, rng)]
        return out


def _text_columns(ds) -> list[str]:
    if "text" not in ds.column_names:
        raise ValueError(f"ds: expected a 'text' column (and 'text_pair' for sentence pairs), got {ds.column_names}")
    if len(ds) == 0:
        raise ValueError("ds: expected at least one example to augment, got an empty dataset")
    return ["text", "text_pair"] if "text_pair" in ds.column_names else ["text"]


def augmented_folder(ds, augmenter: Augmenter, cache_dir: str | Path | None = None) -> Path:
    """Where ``augment`` keeps (or will keep) ``ds``'s augmentation by ``augmenter``: its cache key's folder."""
    from fastkd.cache.store import cache_root

    cols = _text_columns(ds)
    labels = ds["label"] if "label" in ds.column_names else None
    data = data_digest(ds["text"], labels if labels is None or isinstance(labels[0], int) else None,
                       ds["text_pair"] if len(cols) == 2 else None)
    if labels is not None and not isinstance(labels[0], int):  # regression targets: part of the data too
        data = sha256_json([data, [repr(float(v)) for v in labels]])
    key = sha256_json({"data": data, "augmenter": augmenter.fingerprint})[:24]
    return Path(cache_dir or cache_root()) / "augmented" / key


def augment(ds, augmenter: Augmenter, *, cache_dir: str | Path | None = None, progress: bool = True, log=print):
    """``ds``'s rows, then their augmented copies (``source``: the row each comes from; labels carried), as a
    ``datasets.Dataset``; cached under :func:`augmented_folder` and reused, resumed chunk by chunk if killed."""
    import datasets

    t0 = time.perf_counter()
    folder = augmented_folder(ds, augmenter, cache_dir)
    done = folder / "dataset"
    if (folder / "DONE").exists():
        out = datasets.load_from_disk(str(done))
        log(f"augmentation: reusing {folder} ({len(ds)} examples -> {len(out)})")
        return out
    folder.mkdir(parents=True, exist_ok=True)
    cols = _text_columns(ds)
    rows = list(zip(*(ds[c] for c in cols), strict=True))
    (folder / "settings.json").write_text(json.dumps({"settings": asdict(augmenter.settings), "examples": len(ds),
                                                      "columns": cols, "how": augmenter.describe()}, indent=1))
    parts = [folder / f"part-{c:05d}.jsonl" for c in range(0, len(rows), CHUNK_EXAMPLES)]
    left = [p for p in parts if not p.exists()]
    log(f"augmentation of {len(rows)} examples: {augmenter.describe()}; on {augmenter.device}, cached in {folder}"
        + (f" (resuming: {len(parts) - len(left)} of {len(parts)} chunks done)" if len(left) < len(parts) else ""))
    from tqdm import tqdm

    bar = tqdm(total=len(rows), initial=(len(parts) - len(left)) * CHUNK_EXAMPLES, desc="augment", unit="ex",
               disable=not progress, dynamic_ncols=True)
    for part in left:
        start = int(part.stem.split("-")[1])
        chunk = augmenter.copies_of(rows[start:start + CHUNK_EXAMPLES], start)
        tmp = part.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps([src, list(texts)]) + "\n" for src, texts in chunk))
        os.replace(tmp, part)  # a part exists only whole: a killed run redoes at most one chunk
        bar.update(min(CHUNK_EXAMPLES, len(rows) - start))
    bar.close()
    return _assemble(ds, cols, parts, folder, log, time.perf_counter() - t0)


def _assemble(ds, cols: list[str], parts: list[Path], folder: Path, log, seconds: float):
    import datasets

    copies = [json.loads(line) for p in parts for line in p.read_text().splitlines() if line]
    source = list(range(len(ds))) + [src for src, _ in copies]
    table = {c: list(ds[c]) + [texts[k] for _, texts in copies] for k, c in enumerate(cols)}
    features = {c: datasets.Value("string") for c in cols}
    if "label" in ds.column_names:
        labels = ds["label"]
        table["label"] = [labels[i] for i in source]
        features["label"] = ds.features["label"]
    table["source"] = source
    features["source"] = datasets.Value("int64")
    out = datasets.Dataset.from_dict(table, features=datasets.Features(features))
    tmp = folder / "dataset.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    out.save_to_disk(str(tmp))
    shutil.rmtree(folder / "dataset", ignore_errors=True)
    os.replace(tmp, folder / "dataset")
    (folder / "DONE").write_text(str(len(out)))
    for p in parts:
        p.unlink(missing_ok=True)
    log(f"augmentation: {len(ds)} examples -> {len(out)} ({len(copies)} copies, "
        f"{len(copies) / max(1, len(ds)):.1f} per example) in {seconds:.0f} s")
    return datasets.load_from_disk(str(folder / "dataset"))
