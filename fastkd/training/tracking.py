"""``--report-to``: the run's metrics records, also sent to experiment trackers through their own libraries.

Every record ``metrics.jsonl`` gets (training steps, dev evaluations, the final report) goes to each tracker as
scalars at the record's optimizer step: ``train/<stage>/<field>`` (loss, each ``loss_<term>``, lr, samples/s),
``eval/<stage>/dev_acc``, ``final/<field>`` (test accuracies, sizes, latencies, speed-up). One registry entry per
tracker (:data:`TRACKERS`); asking for one whose library is missing fails at set-up, naming the package.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Tracker:
    name: str
    package: str  # what to pip install
    module: str  # what to import
    open: Callable[[Path, dict, int | None], object]  # (output dir, run config, purge step) -> writer


def scalars(record: dict) -> tuple[int, dict[str, float]]:
    """(step, {tag: value}) of a metrics record's finite numbers."""
    step = int(record.get("step", 0))
    event, stage = record.get("event"), record.get("stage", "run")
    if event == "final":
        prefix = "final/"
    elif event == "eval":
        prefix = f"eval/{stage}/"
    elif event is None:
        prefix = f"train/{stage}/"
    else:  # cache statistics and the like: in metrics.jsonl only
        return step, {}
    skip = {"step", "epoch", "stage", "event", "best"}
    out = {prefix + k: float(v) for k, v in record.items()
           if k not in skip and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
    return step, out


class _TensorBoard:
    def __init__(self, out_dir: Path, config: dict, purge_step: int | None):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: a resumed run drops the events the killed one wrote after its checkpoint (metrics.jsonl
        # is cut back the same way), so the curves show each step once.
        self.writer = SummaryWriter(str(out_dir / "tensorboard"), purge_step=purge_step)
        self.writer.add_text("config", "\n".join(f"    {k}: {v}" for k, v in config.items()))

    def write(self, record: dict) -> None:
        step, values = scalars(record)
        for tag, v in values.items():
            self.writer.add_scalar(tag, v, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class _Wandb:
    def __init__(self, out_dir: Path, config: dict, purge_step: int | None):
        import wandb

        self.wandb = wandb
        self.run = wandb.init(project="fastkd", name=out_dir.name, dir=str(out_dir), config=config,
                              resume="allow" if purge_step is not None else None)

    def write(self, record: dict) -> None:
        step, values = scalars(record)
        if values:
            self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


TRACKERS: dict[str, Tracker] = {t.name: t for t in (
    Tracker("tensorboard", "tensorboard", "tensorboard", _TensorBoard),
    Tracker("wandb", "wandb", "wandb", _Wandb),
)}


def parse_report_to(value: str) -> list[str]:
    """``none``, one tracker, or several joined by commas."""
    names = [v.strip() for v in str(value).split(",") if v.strip()]
    if names == ["none"]:
        return []
    unknown = [n for n in names if n not in TRACKERS]
    if unknown or not names:
        raise ValueError(f"--report-to: expected none or a comma-separated list of {', '.join(TRACKERS)}, got "
                         f"{value!r}")
    return names


def check_report_to(value: str) -> str | None:
    """TrainConfig's check: None when fine, else what was expected."""
    try:
        parse_report_to(value)
    except ValueError:
        return f"none or a comma-separated list of {', '.join(TRACKERS)}"
    return None


def check_installed(value: str) -> None:
    """Fail at set-up, before anything trains, when a requested tracker's library is missing."""
    import importlib

    for name in parse_report_to(value):
        tracker = TRACKERS[name]
        try:
            importlib.import_module(tracker.module)
        except ImportError:
            raise ValueError(f"--report-to {name}: the {tracker.package!r} package is not installed; pip install "
                             f"{tracker.package}, or drop it from --report-to") from None


def open_trackers(value: str, out_dir: Path, config: dict) -> Callable[[int | None], list]:
    """A function of the purge step (the resumed step, or None) that opens the requested trackers."""
    names = parse_report_to(value)
    return lambda purge_step: [TRACKERS[n].open(out_dir, config, purge_step) for n in names]
