"""The training engine shared by the distillation trainer and the teacher fine-tune.

Optimizer, schedule, AMP, the finite check, DDP helpers, evaluation, and the step loop: :func:`run_epoch` takes
a ``forward(batch, host) -> (total, terms)`` and knows nothing of methods or losses; :func:`fit_stage` runs it
over a stage's epochs. What a run does around a step (logging, checkpoints, BERT-EMD's weight update) comes in
as the ``on_step`` / ``on_epoch_end`` callbacks.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from fastkd.device import native_bf16
from fastkd.training.batching import Batch, LengthBucketSampler, collate, make_loader


class NonFiniteLossError(FloatingPointError):
    """A loss term came out NaN/inf: the step is not taken and the message names the last good checkpoint."""


# ---------------------------------------------------------------- distributed helpers


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()

    def all_mean(self, x: torch.Tensor) -> torch.Tensor:
        """The mean of ``x`` over ranks (``x`` itself without DDP)."""
        if not self.enabled:
            return x
        x = x.clone()
        torch.distributed.all_reduce(x)
        return x / self.world_size

    def broadcast(self, value):
        """Rank 0's ``value`` on every rank (a picklable object)."""
        if not self.enabled:
            return value
        box = [value]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]


def current_dist() -> Dist:
    """The process group someone else started (torchrun + the HF Trainer, Lightning, accelerate), else none."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return Dist()
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def init_distributed() -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    import torch.distributed as dist

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend)
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
    return Dist(dist.get_rank(), world, local)


# ---------------------------------------------------------------- batches, optimizer, schedule


def batches_for_epoch(sampler: LengthBucketSampler, dataset, pad_token_id: int, *, num_workers: int = 0,
                      pin_memory: bool = False):
    """Collated, dynamically padded batches for the sampler's current epoch (from its resume point).

    Creating a DataLoader iterator draws a seed from the global torch RNG; that draw is undone so an epoch
    resumed mid-way sees the same dropout masks as an uninterrupted run (the RNG state is checkpointed)."""
    rng = torch.get_rng_state()
    it = iter(make_loader(dataset, sampler, pad_token_id, num_workers=num_workers, pin_memory=pin_memory))
    torch.set_rng_state(rng)
    return it


def lr_lambda(total_steps: int, warmup_steps: int):
    def f(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return f


def adamw(params: list[nn.Parameter], lr: float, weight_decay: float, *, fused: bool = True,
          decay_vectors: bool = False) -> torch.optim.AdamW:
    """AdamW; biases and LayerNorm weights (1-D) get no weight decay unless ``decay_vectors``.

    Fused by default, on a CPU too: torch's fused CPU AdamW updated a 17.4M-parameter student in 10 ms where the
    for-loop took 65 ms and foreach 47 ms (2-core Zen 4), about a tenth of a TinyBERT step; it is deterministic,
    so a resumed run stays bit-identical."""
    if decay_vectors:
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused)
    return torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
                              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                             lr=lr, fused=fused)


def warmup_linear(opt: torch.optim.Optimizer, total_steps: int, warmup: float):
    """Linear warm-up over ``warmup`` of the steps, then linear decay to 0."""
    return torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(total_steps, int(warmup * total_steps)))


def autocast_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """--amp: None (off), bf16, or fp16 (with loss scaling). auto: bf16 wherever the device computes it natively
    (CUDA with bf16, a CPU with AVX512-BF16 or AMX), else fp16 on CUDA and off on a CPU (emulated bf16 is slower
    than fp32 there)."""
    if amp == "off":
        return None
    if amp == "auto":
        if native_bf16(device):
            return torch.bfloat16
        return torch.float16 if device.type == "cuda" else None
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]


def kernel_precision_note(amp: torch.dtype | None, device: torch.device, module=None) -> str | None:
    """What the attention and hidden losses compute on, said once: never fp32 on a GPU without the log saying
    so, never the unfused score-map path (``module.score_path_note()``) without saying so."""
    lines = [module.score_path_note()] if module is not None and hasattr(module, "score_path_note") else []
    if device.type == "cuda" and amp is None:
        lines.append("--amp off: the student runs in fp32, so the fused losses take their fp32 kernel paths "
                     "(3xTF32 or IEEE FMAs, several times slower than bf16; docs/kernels.md)")
    elif device.type == "cuda":
        name = str(amp).removeprefix("torch.")
        lines.append(f"autocast {name}: student Q/K reach the fused attention losses in {name}; hidden_mse's "
                     f"projection runs in {name} with an fp32 residual (docs/kernels.md)")
    return "\n".join(x for x in lines if x) or None


def finite_values(terms: dict[str, torch.Tensor], where: str, step: int, last_good: str) -> dict[str, float]:
    """The loss terms as floats (one device-to-host sync for all); raises on NaN/inf naming step and term."""
    flat = torch.stack([v.detach().float().reshape(()) for v in terms.values()]).tolist()
    vals = dict(zip(terms, flat, strict=True))
    if all(math.isfinite(v) for v in vals.values()):
        return vals
    bad = {k: v for k, v in vals.items() if not math.isfinite(v)}
    raise NonFiniteLossError(f"non-finite loss at step {step} ({where}): term "
                             f"{', '.join(f'{k}={v}' for k, v in bad.items())}; last good checkpoint: {last_good}")


def clip_and_norm(fit) -> torch.Tensor:
    """The gradients' total norm, clipped to ``max_grad_norm`` first unless it is 0 (clip_grad_norm_ with 0
    would zero every gradient, not switch clipping off)."""
    if fit.max_grad_norm > 0:
        return torch.nn.utils.clip_grad_norm_(fit.params, fit.max_grad_norm)
    return torch.nn.utils.get_total_norm([p.grad for p in fit.params if p.grad is not None])


def check_gradients(fit, norm: torch.Tensor, step: int) -> None:
    """Refuse a step whose gradients hold NaN/inf (a finite loss can have them), before the optimizer touches
    the weights. With fp16 loss scaling the scaler skips such steps itself, by design."""
    if fit.scaler.is_enabled() or math.isfinite(float(norm)):
        return
    raise NonFiniteLossError(f"non-finite gradients at step {step} ({fit.where}): their norm is {float(norm)} "
                             f"although every loss term was finite; the weights were not updated; last good "
                             f"checkpoint: {fit.last_good()}")


# ---------------------------------------------------------------- the step loop


@dataclass
class Fit:
    """What one stage trains with: the (possibly DDP-wrapped) model, the optimizer and its schedule."""

    model: nn.Module  # called by the forward; DDP's no_sync comes from it
    params: list[nn.Parameter]  # clipped
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    device: torch.device
    dist: Dist = field(default_factory=Dist)
    amp: torch.dtype | None = None
    grad_accum: int = 1
    max_grad_norm: float = 1.0
    name: str = "train"  # the progress bar's
    where: str = "train"  # what an error message calls it
    progress: bool = False
    last_good: Callable[[], str] = lambda: "none (no checkpoint written yet)"


@dataclass
class StepState:
    """Where the loop stands; the counters a checkpoint records."""

    epoch: int = 0
    stage_step: int = 0  # optimizer steps taken in this stage
    global_step: int = 0  # over all stages
    consumed: int = 0  # micro-batches of this epoch consumed (the sampler's resume point)
    samples: int = 0  # examples since the last on_step call that logged (for the throughput)


Forward = Callable[[Batch, Batch], tuple[torch.Tensor, dict[str, torch.Tensor]]]
OnStep = Callable[[StepState, dict[str, float]], None]


def run_epoch(fit: Fit, state: StepState, batches: Iterator[Batch], total: int, forward: Forward,
              on_step: OnStep | None = None) -> None:
    """One epoch: forward, finite check, backward with accumulation; every ``grad_accum`` micro-batches (and at
    the epoch's end) an optimizer step, then ``on_step(state, mean terms)``."""
    from tqdm import tqdm

    bar = tqdm(total=total, initial=state.consumed, desc=fit.name, file=sys.stderr, dynamic_ncols=True,
               disable=not (fit.progress and fit.dist.main), unit="batch")
    fit.model.train()
    cuda = fit.device.type == "cuda"
    micro, acc = 0, {}
    batch = next(batches, None)
    while batch is not None:
        state.consumed += 1
        host, batch = batch, batch.to(fit.device, non_blocking=cuda)
        # Peek whether this is the epoch's last micro-batch: a partial accumulation window still steps.
        nxt = None
        last_micro = (micro + 1) % fit.grad_accum == 0
        if not last_micro:
            nxt = next(batches, None)
            last_micro = nxt is None
        no_sync = fit.model.no_sync() if fit.dist.enabled and not last_micro else contextlib.nullcontext()
        with no_sync:
            with torch.autocast(fit.device.type, dtype=fit.amp or torch.float32, enabled=fit.amp is not None):
                total_loss, terms = forward(batch, host)
            # One device->host transfer per micro-step serves both the NaN/inf check (before backward, so the
            # weights are never touched by a bad step) and the logged running sums.
            values = finite_values(terms, fit.where, state.global_step + 1, fit.last_good())
            fit.scaler.scale(total_loss / fit.grad_accum).backward()
        micro += 1
        state.samples += batch.input_ids.shape[0]
        for k, v in values.items():
            acc[k] = acc.get(k, 0.0) + v / fit.grad_accum
        bar.update(1)
        if last_micro:
            micro = 0
            fit.scaler.unscale_(fit.opt)
            check_gradients(fit, clip_and_norm(fit), state.global_step + 1)
            fit.scaler.step(fit.opt)
            fit.scaler.update()
            fit.sched.step()
            fit.opt.zero_grad(set_to_none=True)
            state.stage_step += 1
            state.global_step += 1
            if on_step is not None:
                on_step(state, acc)
            acc = {}
        batch = nxt if nxt is not None else next(batches, None)
    bar.close()


def fit_stage(fit: Fit, state: StepState, sampler: LengthBucketSampler, data, pad_id: int, epochs: int,
              forward: Forward, *, on_step: OnStep | None = None,
              on_epoch_end: Callable[[StepState], None] | None = None, resume_sampler: dict | None = None,
              num_workers: int = 0) -> None:
    """The stage's epochs from ``state.epoch`` on (mid-epoch from ``resume_sampler``, a sampler state)."""
    cuda = fit.device.type == "cuda"
    for epoch in range(state.epoch, epochs):
        state.epoch = epoch
        sampler.set_epoch(epoch)
        if resume_sampler is not None:
            sampler.load_state_dict(resume_sampler)
            resume_sampler = None
        # DataLoader workers draw batches ahead, so the resume point is the count the loop consumed.
        state.consumed, state.samples = sampler.state_dict()["batches_done"], 0
        batches = batches_for_epoch(sampler, data, pad_id, num_workers=num_workers, pin_memory=cuda)
        name = fit.name
        fit.name = f"{name} e{epoch + 1}"
        try:
            run_epoch(fit, state, batches, len(sampler), forward, on_step)
        finally:
            fit.name = name
        if on_epoch_end is not None:
            on_epoch_end(state)


def steps_per_epoch(sampler: LengthBucketSampler, grad_accum: int) -> int:
    return max(1, math.ceil(len(sampler) / grad_accum))


class Stopwatch:
    """Training time without what is not training: ``with clock.paused(): evaluate()`` keeps evaluations and
    checkpoint writes out of ``clock.train_s``, so a run's time to an accuracy compares with another engine's
    (bench/time_to_accuracy.py) whatever each evaluates and saves on the way."""

    def __init__(self):
        self.start, self.excluded, self._depth, self._since = time.perf_counter(), 0.0, 0, 0.0

    @contextlib.contextmanager
    def paused(self):
        if self._depth == 0:
            self._since = time.perf_counter()
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
            if self._depth == 0:
                self.excluded += time.perf_counter() - self._since

    @property
    def train_s(self) -> float:
        return time.perf_counter() - self.start - self.excluded


class Throughput:
    """Examples per second between two logged steps."""

    def __init__(self):
        self.t = time.perf_counter()

    def rate(self, samples: int, world_size: int) -> float:
        now = time.perf_counter()
        rate = samples * world_size / max(now - self.t, 1e-9)
        self.t = now
        return rate


# ---------------------------------------------------------------- evaluation


def correlations(pred, gold) -> dict[str, float]:
    """Pearson and Spearman (Pearson of the average-tie ranks) of a regression's predictions; 0 for constant
    predictions, which correlate with nothing (the formulas give NaN there)."""
    import numpy as np
    import pandas as pd

    pred, gold = np.asarray(pred, dtype=np.float64), np.asarray(gold, dtype=np.float64)

    def pearson(x, y) -> float:
        if len(x) < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
            return 0.0
        return float(np.corrcoef(x, y)[0, 1])

    ranks = pd.Series(pred).rank().to_numpy(), pd.Series(gold).rank().to_numpy()
    return {"pearson": pearson(pred, gold), "spearman": pearson(*ranks)}


def primary_metric(metrics: dict[str, float]) -> str:
    """The metric best-checkpoint selection maximises: accuracy, or Pearson for a regression."""
    return "acc" if "acc" in metrics else "pearson"


@torch.no_grad()
def evaluate(model: nn.Module, dataset, batch_size: int, device, pad_token_id: int) -> dict[str, float]:
    """A sequence-classification model on a tokenised, labelled dataset: {"acc"}, or {"pearson", "spearman"}
    for a one-output regression head."""
    was_training = model.training
    model.eval()
    lengths = list(dataset["length"])
    order = sorted(range(len(dataset)), key=lambda i: lengths[i])
    preds, golds = [], []
    for c in range(0, len(order), batch_size):
        idx = order[c:c + batch_size]
        rows = dataset[idx]
        starts = rows.get("type_start") or [None] * len(idx)
        batch = collate([{"index": i, "input_ids": rows["input_ids"][j], "label": rows["label"][j],
                          "type_start": starts[j]} for j, i in enumerate(idx)], pad_token_id).to(device)
        logits = model(**batch.model_inputs()).logits
        preds.append(logits[:, 0].float() if logits.shape[-1] == 1 else logits.argmax(-1))
        golds.append(batch.labels)
    model.train(was_training)
    if not preds:
        return {"acc": 0.0}
    pred, gold = torch.cat(preds).cpu(), torch.cat(golds).cpu()
    if pred.is_floating_point():
        return correlations(pred.numpy(), gold.float().numpy())
    return {"acc": int((pred == gold).sum()) / len(order)}
