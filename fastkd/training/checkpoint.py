"""A run's files: its identity (``run.json``, checked by ``--resume``), atomic checkpoints with RNG state and
rotation, and ``metrics.jsonl`` (cut back to the checkpoint on resume)."""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from fastkd.digest import sha256_file
from fastkd.disk import writing
from fastkd.training.engine import NonFiniteLossError

RUN_FILE = "run.json"


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


def atomic_save(obj, path: Path, kept: str = "") -> None:
    """torch.save to a temporary file, fsync, rename: a kill leaves the old file or the new one, never half; a
    full disk leaves no partial file and raises DiskFullError saying what was ``kept``."""
    tmp = path.with_name(path.name + ".tmp")
    with writing(tmp, path.name, kept):
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


def _digest_file(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def save_checkpoint(out_dir: Path, state: dict, keep: int, last_good: Path | None = None) -> Path:
    """``state`` (with the RNG state added) as ``checkpoints/step-<global_step>.pt`` plus its sha256 beside it
    (written after it: a checkpoint without one was cut short); only the newest ``keep`` stay on disk. The model
    and optimizer state are verified finite first: a bad one is never written, so the newest on disk (the one a
    resume and an error message name) is always good, and rotation only drops older good ones."""
    bad = nonfinite_tensors({"model": state["model"], "optimizer": state["optimizer"]})
    if bad:
        raise NonFiniteLossError(
            f"non-finite weights or optimizer state after step {state['global_step']}: {', '.join(bad[:4])}"
            + (f" and {len(bad) - 4} more" if len(bad) > 4 else "") + "; not writing a checkpoint of them; last "
            f"good checkpoint: {last_good or 'none (no checkpoint written yet)'}")
    ckdir = out_dir / "checkpoints"
    ckdir.mkdir(parents=True, exist_ok=True)
    path = ckdir / f"step-{state['global_step']}.pt"
    kept = f"the last good checkpoint, {last_good}, is kept" if last_good else "no checkpoint was written yet"
    atomic_save({**state, "rng": rng_state()}, path, kept + "; free space, then --resume")
    tmp = _digest_file(path).with_suffix(".tmp")
    with writing(tmp, _digest_file(path).name, kept):
        tmp.write_text(sha256_file(path) + "\n")
    os.replace(tmp, _digest_file(path))
    for old in _checkpoints(out_dir)[:-keep]:
        old.unlink(missing_ok=True)
        _digest_file(old).unlink(missing_ok=True)
    return path


def remove_run_checkpoints(out_dir: Path) -> int:
    """Remove a finished run's mid-run checkpoints (they only serve --resume); returns the bytes freed."""
    folder = out_dir / "checkpoints"
    if not folder.is_dir():
        return 0
    freed = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    shutil.rmtree(folder)
    return freed


def _verified_load(path: Path) -> dict:
    """A checkpoint whose bytes match its recorded sha256, loaded; raises ValueError saying what is wrong."""
    digest = _digest_file(path)
    if not digest.is_file():
        raise ValueError("it has no recorded checksum (its write was cut short)")
    if sha256_file(path) != digest.read_text().strip():
        raise ValueError(f"its bytes do not match its sha256 ({path.stat().st_size} bytes: truncated or altered)")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means the same: not usable
        raise ValueError(f"it does not load ({type(e).__name__}: {e})") from e


def load_newest_intact(out_dir: Path, log) -> tuple[Path | None, dict | None]:
    """The newest checkpoint that verifies (sha256) and loads, falling back to older ones and saying so;
    (None, None) when there is none at all; ValueError when there are some but none is intact."""
    ckpts = _checkpoints(out_dir)
    problems = []
    for path in reversed(ckpts):
        try:
            state = _verified_load(path)
        except ValueError as e:
            problems.append(f"{path.name}: {e}")
            log(f"resume: checkpoint {path} is not intact ({e}); trying the one before it")
            continue
        if problems:
            log(f"resume: using {path.name}, the newest intact checkpoint")
        return path, state
    if ckpts:
        raise ValueError(f"--resume: no intact checkpoint in {out_dir / 'checkpoints'} ({'; '.join(problems)}); "
                         f"start the run again in a new --output-dir")
    return None, None


LOCK_FILE = ".lock"


class OutputLock:
    """An exclusive lock on a run's folder (flock on ``<out>/.lock``, released when the process ends however it
    ends): two runs sharing one --output-dir interleaved their metrics and checkpoints, or one died on the other's
    missing .tmp file. The holder's pid is written into the file for the second run's error."""

    def __init__(self, out: Path):
        import fcntl

        if out.exists() and not out.is_dir():
            raise ValueError(f"--output-dir: {out} is a file, not a folder; choose a folder")
        self.fd = None
        # The outermost folder this run creates: a run that fails before training removes it (discard).
        self.created = next((p for p in reversed([out, *out.parents]) if not p.exists()), None)
        try:  # the lock file is also the check that the folder is writable, before anything is loaded
            out.mkdir(parents=True, exist_ok=True)
            self.fd = os.open(out / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise ValueError(f"--output-dir: {out} is not writable ({e.strerror}); choose a folder this user can "
                             f"write") from e
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(self.fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(self.fd)
            raise ValueError(f"--output-dir: {out} is in use by another run (pid {holder}); wait for it to end or "
                             f"choose another --output-dir") from None
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"{os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor drops the flock
            self.fd = None

    def discard(self) -> None:
        """Release, and remove the folders this run created (an error before training: nothing worth keeping, and
        a folder holding only a dead process's lock would greet the next run)."""
        self.release()
        if self.created is not None:
            shutil.rmtree(self.created, ignore_errors=True)


def default_output_dir(method: str, task: str) -> Path:
    """``runs/<method>-<task>-<time>``, for a run given no --output-dir."""
    return Path("runs") / f"{method}-{Path(task).stem}-{time.strftime('%Y%m%d-%H%M%S')}"


def check_output_dir(out: Path, resume: bool, identity: dict, log) -> tuple[Path, bool]:
    """(the run's folder, whether to resume): a new or empty folder, or with --resume the same run's (its
    ``identity`` unchanged); a --resume of a folder holding no run yet starts it."""
    run_file = out / RUN_FILE
    holds_files = out.exists() and any(p.name != LOCK_FILE for p in out.iterdir())
    if resume and not run_file.is_file() and not holds_files:
        log(f"resume: {out} holds no run yet (killed before its first checkpoint?); starting it")
        return out, False
    if resume:
        if (out / "result.json").is_file() and not _checkpoints(out):
            raise ValueError(f"--resume: {out} holds a finished run (result.json), whose mid-run checkpoints were "
                             f"removed when it finished; nothing to resume (--keep-run-checkpoints keeps them)")
        if not run_file.is_file():
            raise ValueError(f"--resume: {out} holds files but no run to resume (no {RUN_FILE}); choose the "
                             f"run's own --output-dir")
        saved = _read_run_file(run_file)["identity"]
        mine = json.loads(json.dumps(identity))
        diff = {k: (saved.get(k), v) for k, v in mine.items() if saved.get(k) != v}
        if diff:
            raise ValueError(f"--resume: {out} holds a different run; settings differ: "
                             + ", ".join(f"{k} (saved {a!r}, now {b!r})" for k, (a, b) in diff.items()))
    elif holds_files:
        what = "other files"
        if run_file.is_file():
            saved = _read_run_file(run_file)
            what = f"another run (method {saved['identity'].get('method')}, started {saved.get('started')})"
        raise ValueError(f"--output-dir: {out} already holds {what}; pass --resume to continue it or choose "
                         f"an empty/new --output-dir")
    return out, resume


def _read_run_file(path: Path) -> dict:
    try:
        saved = json.loads(path.read_text())
        saved["identity"]  # noqa: B018 - present in every run file
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"--resume: {path} is damaged ({type(e).__name__}: {e}); it identifies the run, so the run "
                         f"can't be continued safely: start it again in a new --output-dir") from e
    return saved


def write_run_file(out: Path, identity: dict, options: dict, recipe_text: str) -> None:
    """``run.json``: the run's identity (checked by --resume), every option, when it started and its recipe."""
    out.mkdir(parents=True, exist_ok=True)
    (out / RUN_FILE).write_text(json.dumps(
        {"identity": identity, "config": options, "started": time.strftime("%c"), "recipe": recipe_text}, indent=1,
        default=str))


class MetricsLog:
    """``metrics.jsonl``: one JSON record a line, flushed as written; only the main rank writes. ``trackers``:
    a function of the resumed step (None: a fresh run) opening the --report-to writers, which get every record
    too; they open at the first record, after a resume has cut the log back."""

    def __init__(self, path: Path, enabled: bool = True, trackers=None):
        self.path, self.enabled, self.file = path, enabled, None
        self._open_trackers, self.trackers, self.resumed_at = trackers, None, None

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        if self.file is None:
            self.file = open(self.path, "a")
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.trackers is None:
            self.trackers = self._open_trackers(self.resumed_at) if self._open_trackers else []
        for t in self.trackers:
            t.write(record)

    def close(self) -> None:
        for t in self.trackers or []:
            t.close()
        self.trackers = None
        if self.file is not None:
            self.file.close()
            self.file = None

    def truncate(self, step: int) -> None:
        """On resume, drop records written after the checkpoint (they will be produced again)."""
        self.resumed_at = step
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
