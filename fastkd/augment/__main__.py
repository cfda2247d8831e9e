"""``python -m fastkd.augment``: a task's training data augmented as TinyBERT augments it, written as a ``datasets``
folder and a TSV (``train.tsv`` in it), without training anything. The same cache serves ``fastkd.train
--augment``: a run on the same data, models and settings reuses what this command made.

    python -m fastkd.augment --task sst2 --output aug-sst2 --copies 20
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

from fastkd.augment import Augmenter, AugmentSettings, augment

DEFAULTS = AugmentSettings()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fastkd.augment", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--task", required=True, help="task name (sst2, agnews, GLUE pairs), a labelled data file or "
                   "folder, as fastkd.train's --task")
    p.add_argument("--output", required=True, help="folder to write: a datasets folder (load_from_disk) and "
                   "train.tsv")
    p.add_argument("--teacher", default=None, help="the model whose tokenizer splits words and whose input "
                   "embeddings give the neighbours when --mlm is not named (default: the packaged MiniLM)")
    p.add_argument("--mlm", default=None, help="a fill-mask model (folder or cached hub name) for single-piece "
                   "words, as TinyBERT uses BERT-base's (default: none; embedding neighbours for every word)")
    p.add_argument("--embeddings", default=None, help="a GloVe-format text file for the neighbours, as TinyBERT "
                   "uses glove.6B.300d (default: the masked LM's, else the teacher's input embeddings)")
    p.add_argument("--copies", type=int, default=DEFAULTS.copies, help="N: augmented copies per example")
    p.add_argument("--candidates", type=int, default=DEFAULTS.candidates, help="M: candidates per word")
    p.add_argument("--p", type=float, default=DEFAULTS.p, help="probability that a word is replaced")
    p.add_argument("--seed", type=int, default=0, help="seed of the draws and of the subset")
    p.add_argument("--max-examples", type=int, default=0, help="a seeded subset of the training data, drawn as "
                   "fastkd.train's --max-train-examples draws it (0: all)")
    p.add_argument("--text-column", default=None)
    p.add_argument("--label-column", default=None)
    p.add_argument("--text-pair-column", default=None)
    p.add_argument("--batch-size", type=int, default=DEFAULTS.batch_size, help="masked-LM queries per forward")
    p.add_argument("--device", default=None, help="default: cuda when there is one, else cpu")
    p.add_argument("--cache-dir", default=None, help="default: $FASTKD_CACHE_DIR, else ~/.cache/fastkd")
    p.add_argument("--no-progress", action="store_true")
    return p


def write_tsv(ds, path: Path) -> None:
    """Labels as the class ids the data set uses (its own TSVs do), so the file reads in place of its train.tsv
    with ids that mean what the dev and test splits' ids mean; the datasets folder keeps the names too."""
    cols = [c for c in ("text", "text_pair", "label", "source") if c in ds.column_names]
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh, delimiter="\t", quoting=csv.QUOTE_MINIMAL, lineterminator="\n")
        w.writerow(cols)
        for row in ds.select_columns(cols).iter(batch_size=1000):
            w.writerows(zip(*(row[c] for c in cols), strict=True))


def main(argv: list[str] | None = None) -> int:
    from fastkd.data import load_texts
    from fastkd.models.teacher import resolve_model_path
    from fastkd.train import error_text, quiet_libraries
    from fastkd.training.rundata import subset

    args = build_parser().parse_args(argv)
    try:
        if args.max_examples < 0:
            raise ValueError(f"--max-examples: expected 0 (all) or a positive count, got {args.max_examples}")
        settings = AugmentSettings(copies=args.copies, candidates=args.candidates, p=args.p, mlm=args.mlm,
                                   embeddings=args.embeddings, seed=args.seed, batch_size=args.batch_size)
        quiet_libraries()
        train = load_texts(args.task, "train", text_column=args.text_column, label_column=args.label_column,
                           text_pair_column=args.text_pair_column)
        train = subset(train, args.max_examples or None, args.seed)
        augmenter = Augmenter(settings, model=resolve_model_path(args.teacher), device=args.device)
        out = augment(train, augmenter, cache_dir=args.cache_dir, progress=not args.no_progress)
    except (ValueError, FileNotFoundError) as e:
        print(error_text(e).replace("fastkd.train:", "fastkd.augment:", 1), file=sys.stderr)
        return 2
    folder = Path(args.output)
    out.save_to_disk(str(folder))
    write_tsv(out, folder / "train.tsv")
    print(f"wrote {len(out)} examples ({len(train)} originals, then their copies) to {folder} (datasets folder) and "
          f"{folder / 'train.tsv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
