"""A run's files: its identity (``run.json``, checked by ``--resume``), atomic checkpoints with RNG state and
rotation, and ``metrics.jsonl`` (cut back to the checkpoint on resume)."""

from __future__ import annotations

import dataclasses
import json
import os
import random
import time
from pathlib import Path

import numpy as np
import torch

RUN_FILE = "run.json"
# Config fields that must match for --resume to continue a run (the rest, e.g. --save-every, may change).
IDENTITY = ("method", "mode", "task", "text_column", "label_column", "text_pair_column", "teacher", "etd",
            "student_layers", "student_hidden", "student_heads", "student_ffn", "batch_size", "grad_accum", "seed",
            "epochs", "max_train_examples", "overrides", "finetune_epochs", "finetune_examples", "finetune_seed")


def rng_state() -> dict:
    st = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict) -> None:
    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def atomic_save(obj, path: Path) -> None:
    """torch.save to a temporary file, fsync, rename: a kill leaves the old file or the new one, never half."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def nonfinite_tensors(obj, prefix: str = "") -> list[str]:
    """The names of the floating tensors in a (nested) state holding NaN/inf; one device-to-host sync."""
    found: list[tuple[str, torch.Tensor]] = []

    def walk(o, name):
        if isinstance(o, torch.Tensor):
            if o.is_floating_point() and o.numel():
                found.append((name, o))
        elif isinstance(o, dict):
            for k, v in o.items():
                walk(v, f"{name}.{k}" if name else str(k))
        elif isinstance(o, (list, tuple)):
            for i, v in enumerate(o):
                walk(v, f"{name}[{i}]")

    walk(obj, prefix)
    if not found:
        return []
    finite = torch.stack([torch.isfinite(t).all().to("cpu") for _, t in found]).tolist()
    return [name for (name, _), ok in zip(found, finite, strict=True) if not ok]


def _checkpoints(out_dir: Path) -> list[Path]:
    return sorted((out_dir / "checkpoints").glob("step-*.pt"), key=lambda p: int(p.stem.split("-")[1]))


def latest_checkpoint(out_dir: Path) -> Path | None:
    ckpts = _checkpoints(out_dir)
    return ckpts[-1] if ckpts else None


def save_checkpoint(out_dir: Path, state: dict, keep: int) -> Path:
    """``state`` (with the RNG state added) as ``checkpoints/step-<global_step>.pt``; only the newest ``keep``
    stay on disk."""
    ckdir = out_dir / "checkpoints"
    ckdir.mkdir(parents=True, exist_ok=True)
    path = ckdir / f"step-{state['global_step']}.pt"
    atomic_save({**state, "rng": rng_state()}, path)
    for old in _checkpoints(out_dir)[:-keep]:
        old.unlink(missing_ok=True)
    return path


def run_identity(cfg) -> dict:
    return {k: getattr(cfg, k) for k in IDENTITY}


def check_output_dir(cfg, log, *, check: bool = True) -> Path:
    """The run's folder: a new or empty one, or with --resume the same run's (its identity settings unchanged).
    Sets ``cfg.output_dir`` when unset; a --resume of a folder holding no run yet starts it. ``check=False``
    (ranks other than 0, which only read the folder rank 0 checked) only names it."""
    if cfg.output_dir is None:
        cfg.output_dir = str(Path("runs") / f"{cfg.method}-{Path(cfg.task).stem}-{time.strftime('%Y%m%d-%H%M%S')}")
    out = Path(cfg.output_dir)
    if not check:
        return out
    run_file = out / RUN_FILE
    holds_files = out.exists() and any(out.iterdir())
    if cfg.resume and not run_file.is_file() and not holds_files:
        log(f"resume: {out} holds no run yet (killed before its first checkpoint?); starting it")
        cfg.resume = False
    if cfg.resume:
        if not run_file.is_file():
            raise ValueError(f"--resume: {out} holds files but no run to resume (no {RUN_FILE}); choose the "
                             f"run's own --output-dir")
        saved = json.loads(run_file.read_text())["identity"]
        mine = json.loads(json.dumps(run_identity(cfg)))
        diff = {k: (saved.get(k), v) for k, v in mine.items() if saved.get(k) != v}
        if diff:
            raise ValueError(f"--resume: {out} holds a different run; settings differ: "
                             + ", ".join(f"{k} (saved {a!r}, now {b!r})" for k, (a, b) in diff.items()))
    elif holds_files:
        what = "other files"
        if run_file.is_file():
            saved = json.loads(run_file.read_text())
            what = f"another run (method {saved['identity'].get('method')}, started {saved.get('started')})"
        raise ValueError(f"--output-dir: {out} already holds {what}; pass --resume to continue it or choose "
                         f"an empty/new --output-dir")
    return out


def write_run_file(out: Path, cfg, recipe_text: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / RUN_FILE).write_text(json.dumps(
        {"identity": run_identity(cfg), "config": dataclasses.asdict(cfg), "started": time.strftime("%c"),
         "recipe": recipe_text}, indent=1, default=str))


class MetricsLog:
    """``metrics.jsonl``: one JSON record a line, flushed as written; only the main rank writes."""

    def __init__(self, path: Path, enabled: bool = True):
        self.path, self.enabled, self.file = path, enabled, None

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        if self.file is None:
            self.file = open(self.path, "a")
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def truncate(self, step: int) -> None:
        """On resume, drop records written after the checkpoint (they will be produced again)."""
        if not self.path.is_file() or not self.enabled:
            return
        keep = []
        for line in self.path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by the kill
            if rec.get("step", 0) <= step:
                keep.append(line)
        self.path.write_text("".join(x + "\n" for x in keep))
