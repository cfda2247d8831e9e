"""The end of a run: the final student, test accuracy, CPU latency, result.json, the loss plot and the printed
report."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fastkd.cache.store import cache_root
from fastkd.device import release_freed_host_memory
from fastkd.disk import save_model_dir
from fastkd.models.teacher import load_model
from fastkd.student.make import student_view
from fastkd.training.checkpoint import remove_run_checkpoints
from fastkd.training.engine import evaluate


def _forward_ms(model: nn.Module, x: torch.Tensor, mask: torch.Tensor) -> float:
    t0 = time.perf_counter()
    model(input_ids=x, attention_mask=mask)
    return 1000 * (time.perf_counter() - t0)


@torch.no_grad()
def paired_latency_ms(teacher: nn.Module, student: nn.Module, input_ids: list[int], runs: int = 20,
                      student_ids: list[int] | None = None) -> tuple[list[float], list[float]]:
    """Batch-1 CPU latencies (ms, fp32, after warm-up) of both models on one sequence, timed in alternation: a
    load spike on a shared machine then hits a teacher run and the student run beside it alike, instead of one
    model's whole series (the same student was once reported at 141x and at 0.065x)."""
    models = [m.to("cpu").float().eval() for m in (teacher, student)]
    xs = [torch.tensor([ids]) for ids in (input_ids, student_ids or input_ids)]  # the student's own tokens
    for m, x in zip(models, xs, strict=True):
        for _ in range(3):
            m(input_ids=x, attention_mask=torch.ones_like(x))
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(max(1, runs)):
        for series, m, x in zip(times, models, xs, strict=True):
            series.append(_forward_ms(m, x, torch.ones_like(x)))
    return times


def speedup_summary(teacher_ms: list[float], student_ms: list[float]) -> dict:
    """The speed-up as the ratio of the two median latencies (so it agrees with the medians printed beside it:
    the median of the pair ratios once read 1.87x beside medians whose ratio was 1.42x), and its spread as the
    10th to 90th percentile of the ratios of the alternating pairs."""
    t_med, s_med = float(np.median(teacher_ms)), float(np.median(student_ms))
    ratios = np.array(teacher_ms) / np.maximum(np.array(student_ms), 1e-9)
    return {"speedup": t_med / max(s_med, 1e-9), "speedup_p10": float(np.percentile(ratios, 10)),
            "speedup_p90": float(np.percentile(ratios, 90)), "latency_runs": len(ratios),
            "teacher_latency_ms": t_med, "student_latency_ms": s_med}


def _records(metrics: Path) -> list[dict]:
    return [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()] if metrics.is_file() else []


def plot_losses(metrics: Path, png: Path) -> None:
    """``loss.png`` from ``metrics.jsonl`` (see :func:`loss_figure`)."""
    import matplotlib.pyplot as plt

    fig = loss_figure(_records(metrics))
    fig.savefig(png, dpi=100)
    plt.close(fig)


def loss_figure(all_recs: list[dict]):
    """Every logged loss against the optimizer step (log scale), stage boundaries dotted, and the dev accuracy of
    each evaluation on a second axis. Series of few points get markers: a run shorter than --log-every logs one
    point per stage, which a line alone never drew (blank axes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = [r for r in all_recs if "loss" in r and "event" not in r]
    metric = "dev_pearson" if any("dev_pearson" in r for r in all_recs) else "dev_acc"  # a regression's, or acc
    evals = [r for r in all_recs if r.get("event") == "eval" and metric in r]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    keys = sorted({k for r in recs for k in r if k.startswith("loss_")})
    stages = list(dict.fromkeys(r["stage"] for r in recs))  # in run order
    for color, k in zip(plt.rcParams["axes.prop_cycle"].by_key()["color"] * 4, ["loss", *keys], strict=False):
        # One line per stage: a stage's total is another sum of other terms, so no line joins two stages.
        label = k  # on the first stage that logs the term
        for stage in stages:
            pts = [(r["step"], r[k]) for r in recs if k in r and r["stage"] == stage]
            if pts:
                ax.plot(*zip(*pts, strict=True), color=color, label=label, lw=1.5 if k == "loss" else 1,
                        marker="o" if len(pts) <= 20 else None, ms=3)
                label = None
    for stage in stages[1:]:
        start = min(r["step"] for r in recs if r["stage"] == stage)
        ax.axvline(start, color="grey", ls=":", lw=1)
    for stage in stages:  # each stage's name above its first step
        ax.annotate(stage, (min(r["step"] for r in recs if r["stage"] == stage), 1), xycoords=("data", "axes fraction"),
                    xytext=(3, -12), textcoords="offset points", fontsize=8, color="grey")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    positive = all(r[k] > 0 for r in recs for k in r if k.startswith("loss"))
    ax.set_yscale("log" if positive else "symlog", **({} if positive else {"linthresh": 1e-3}))
    if evals:  # on its own axis, named there: not a loss, so not in the losses' legend
        acc = ax.twinx()
        label = metric.replace("_", " ").replace("acc", "accuracy")
        acc.plot([r["step"] for r in evals], [r[metric] for r in evals], color="black", ls="--", marker="s", ms=4)
        acc.set_ylabel(f"{label} (black, dashed)")
        acc.set_ylim(0 if metric == "dev_acc" else -1, 1)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    ax.set_title("fastkd distillation losses" + (" and dev accuracy" if evals else ""))
    fig.tight_layout()
    return fig


def report(result: dict, note: str) -> str:
    lines = []
    if note:
        lines.append(note)
    for key, name in (("acc", "accuracy"), ("pearson", "Pearson"), ("spearman", "Spearman")):
        if f"teacher_test_{key}" in result:
            lines.append(f"teacher test {name}: {result[f'teacher_test_{key}']:.4f} ({result['test_examples']} "
                         f"examples)")
            lines.append(f"student test {name}: {result[f'student_test_{key}']:.4f}")
    if "student_params" in result:
        ratio = result["teacher_params"] / result["student_params"]
        lines.append(f"student size: {result['student_params'] / 1e6:.2f}M params (teacher "
                     f"{result['teacher_params'] / 1e6:.2f}M, {ratio:.2f}x smaller)")
        lines.append(f"speed-up: {result['speedup']:.2f}x = teacher {result['teacher_latency_ms']:.1f} ms / student "
                     f"{result['student_latency_ms']:.1f} ms (median CPU batch-1 latencies on "
                     f"{result['latency_tokens']} tokens over {result['latency_runs']} alternating runs; the "
                     f"pairs' ratios span {result['speedup_p10']:.2f}x-{result['speedup_p90']:.2f}x, 10th-90th "
                     f"percentile)")
    lines.append(f"student saved to: {result['student_dir']} (metrics.jsonl, loss.png in {result['output_dir']})")
    lines.append(f"wall time: {result.get('wall_s', 0):.0f}s")
    return "\n".join(lines)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@dataclass
class RunSummary:
    """What the end of a run reads: the trained student and where it goes, the teacher it is compared with, the
    data splits, the counters and records of the run, and the options that shape the report."""

    out_dir: Path
    student: nn.Module
    main: bool  # only rank 0 writes best/ and the student, so only it reads them
    best: dict | None
    device: torch.device
    tokenizer: Any  # saved with the student (its own, for a student with another tokenizer)
    teacher_path: Path
    data: dict
    pad_id: int
    student_tokens: Any  # fastkd.student.make.StudentTokens, or None
    teacher_forwards: int
    cache_stats: list[dict]
    global_step: int
    mode: str
    latency_runs: int
    keep_checkpoints: bool
    cache_dir: str | None
    metrics: Any  # fastkd.training.checkpoint.MetricsLog
    log: Callable[[str], None]


def finish_run(run: RunSummary, t_start: float) -> dict:
    """Save the student (the best dev checkpoint when there is one) and its tokenizer, evaluate teacher and
    student on the test split, time both on the CPU, write result.json, the final metrics line and loss.png."""
    release_freed_host_memory()  # the training's freed memory, before this phase loads two more models
    student = run.student
    final_dir = run.out_dir / "student"
    result: dict = {"output_dir": str(run.out_dir), "student_dir": str(final_dir)}
    if not run.main:
        # Only rank 0 writes best/ and the student, so only it reads them: another rank loading best/ here raced
        # rank 0's last write of it (a missing model.safetensors or a half-written config.json).
        return result
    if run.best is not None and (run.out_dir / "best").is_dir():
        student = type(student).from_pretrained(run.out_dir / "best", dtype=torch.float32).to(run.device)
        key = next(k for k in run.best if k.startswith("dev_"))
        run.log(f"student: best dev checkpoint (stage {run.best['stage']}, epoch {run.best['epoch'] + 1}, "
                f"{key.replace('_', ' ')} {run.best[key]:.4f})")
    save_model_dir(final_dir, student, run.tokenizer, kept=f"best/ and the checkpoints in {run.out_dir} are kept")
    if run.mode == "task" and run.data.get("test") is not None:
        teacher32 = load_model(run.teacher_path, head=True).to(run.device)
        for who, model in (("teacher", teacher32), ("student", student)):
            split, pad = (run.data["test"], run.pad_id) if who == "teacher" else student_view(
                run.student_tokens, run.data, "test", run.pad_id)
            metrics = evaluate(model, split, 64, run.device, pad)
            result.update({f"{who}_test_{k}": v for k, v in metrics.items()})
        result["test_examples"] = len(run.data["test"])
    else:
        teacher32 = load_model(run.teacher_path, head=False)
    result.update(_latency(run, teacher32, student))
    result["teacher_forwards"] = run.teacher_forwards
    result["cache"] = run.cache_stats
    result["wall_s"] = time.time() - t_start
    result["best"] = run.best
    (run.out_dir / "result.json").write_text(json.dumps(result, indent=1, default=str))
    run.metrics.write({"step": run.global_step, "event": "final", **{k: v for k, v in result.items()
                                                                    if k != "cache"}})
    plot_losses(run.out_dir / "metrics.jsonl", run.out_dir / "loss.png")
    if not run.keep_checkpoints:
        freed = remove_run_checkpoints(run.out_dir)
        if freed:
            run.log(f"checkpoints: removed the mid-run checkpoints ({freed / 2**20:.0f} MiB; the run finished, so "
                    f"nothing is left to resume; --keep-run-checkpoints keeps them). Kept in {run.out_dir}: "
                    f"student/, best/, metrics.jsonl, loss.png, result.json; the fine-tuned teacher and the "
                    f"activation cache stay in {cache_root() if run.cache_dir is None else run.cache_dir}")
    return result


def _latency(run: RunSummary, teacher32: nn.Module, student: nn.Module) -> dict:
    """Sizes and the paired CPU latency, on a median-length example of the data held out from training when
    there is any."""
    name = next(k for k in ("test", "dev", "task", "general") if run.data.get(k) is not None)
    ref = run.data[name]
    lengths = sorted(ref["length"])
    median_len = int(lengths[len(lengths) // 2])
    row = next(r for r in ref if r["length"] == median_len)
    tokens = run.student_tokens
    s_ids = None if tokens is None or name not in tokens.splits else \
        tokens.splits[name][int(row["index"])]["input_ids"]  # the same example, the student's tokens
    return {"teacher_params": count_params(teacher32), "student_params": count_params(student),
            "latency_tokens": median_len,
            **speedup_summary(*paired_latency_ms(teacher32, student, row["input_ids"], run.latency_runs,
                                                 student_ids=s_ids))}
