"""Checkpoints: atomic saves, RNG state, the newest checkpoint, the run's identity."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch

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


