"""The contestants of the time-to-accuracy benchmark (bench/time_to_accuracy.py), one per process:

    python -m bench.tta_engines SPEC.json        # writes SPEC's "out" (a JSON trace)

Each runs TinyBERT task distillation (or, for the HF Trainer, logit KD) the way its users run it, from the
same fine-tuned teacher and student folder, on the same tokenised data (fastkd's own loading, from the same
options), evaluating the student with one shared function (``fastkd.training.engine.evaluate``) on the same dev
subset after every ``eval_every`` optimizer steps (counted over both stages) and at each stage's end. Its clock
(``fastkd.training.engine.Stopwatch``) runs from the first stage's start and leaves out evaluations and
checkpoint writes; they are reported apart.

- ``fastkd``: ``fastkd.train.main`` on the CLI's options (``--student`` the shared folder, ``--eval-every``); its
  metrics.jsonl gives the trace.
- ``textbrewer``: TextBrewer's ``GeneralDistiller``, TinyBERT's matches (embedding and mapped hidden states by
  ``hidden_mse``, mapped layers' pre-softmax attention scores by ``attention_mse``, with the input mask; a
  ``linear`` projection per match where widths differ), then the prediction stage (soft cross-entropy, T = 1),
  on fastkd's batches in fastkd's order, fastkd's learning-rate schedule, grouped AdamW (PyTorch's default
  implementation, as a user creates it), clipping at 1.0, fp32 (TextBrewer's half precision needs apex and CUDA).
  The attention scores come from forward hooks on each mapped layer's query and key projections (HF's BERT
  returns post-softmax maps only, and only with eager attention).
- ``hf-trainer``: ``transformers.Trainer`` with a logit-KD ``compute_loss`` (alpha·KL·T² + (1 − alpha)·CE with
  the teacher's logits computed in the loss), its own sampler and defaults, as many epochs as both TinyBERT
  stages together.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from fastkd.training.engine import Stopwatch, evaluate


class Trace:
    """What a contestant reports: its evaluations (step, stage, train_s, dev_acc, eval_s), per-stage samples and
    training seconds, and every step's total loss (for the equal-losses check)."""

    def __init__(self, dev, pad_id: int, device, every: int, max_train_s: float | None = None):
        self.dev, self.pad_id, self.device, self.every = dev, pad_id, device, every
        self.max_train_s = max_train_s
        self.capped = False
        self.clock = Stopwatch()
        self.evals: list[dict] = []
        self.stages: list[dict] = []
        self.losses: list[float] = []
        self.step = 0
        self._stage_start = 0.0

    def evaluate(self, model, stage: str) -> None:
        with self.clock.paused():
            t0 = time.perf_counter()
            acc = evaluate(model, self.dev, 64, self.device, self.pad_id)["acc"]
            self.evals.append({"step": self.step, "stage": stage, "train_s": self.clock.train_s, "dev_acc": acc,
                               "eval_s": time.perf_counter() - t0})

    def stepped(self, model, stage: str) -> None:
        """After an optimizer step: the shared schedule's evaluation when it is due."""
        self.step += 1
        if self.every and self.step % self.every == 0:
            self.evaluate(model, stage)
        if self.max_train_s is not None and self.clock.train_s > self.max_train_s:
            self.capped = True
            raise OverBudget

    def end_stage(self, model, name: str, samples: int) -> None:
        now = self.clock.train_s
        self.stages.append({"name": name, "samples": samples, "train_s": now - self._stage_start})
        if not self.evals or self.evals[-1]["step"] != self.step:
            self.evaluate(model, name)
        self._stage_start = self.clock.train_s

    def result(self) -> dict:
        return {"evals": self.evals, "stages": self.stages, "losses": self.losses, "capped": self.capped}


class OverBudget(Exception):
    """A peer ran past the benchmark's cap (a multiple of fastkd's training time): it stops there."""


def load_job(spec: dict):
    """fastkd's config, tokenizer and tokenised splits for the spec's options: every contestant's data is
    fastkd's loading of the same options (same subset, tokens, example order)."""
    from transformers import AutoTokenizer

    from fastkd.config import parse_config
    from fastkd.training.rundata import load_run_data
    from fastkd.training.trainer import data_settings

    cfg = parse_config(spec["fastkd_argv"])
    tok = AutoTokenizer.from_pretrained(spec["teacher"])
    run = load_run_data(data_settings(cfg), tok, on_cpu=not torch.cuda.is_available(), needs_general=False,
                        finetunes=False, log=lambda *_: None)
    return cfg, tok, run.splits


def stage_batches(data, batch_size: int, seed: int, pad_id: int):
    """The batches of one one-epoch stage in fastkd's order (its sampler, seeded as the trainer seeds it)."""
    from fastkd.training.batching import LengthBucketSampler
    from fastkd.training.engine import batches_for_epoch

    sampler = LengthBucketSampler(data["length"], batch_size, seed=seed, shuffle=True)
    sampler.set_epoch(0)
    return list(batches_for_epoch(sampler, data, pad_id))


# ---------------------------------------------------------------- fastkd


def run_fastkd(spec: dict) -> dict:
    from fastkd.train import main

    out = Path(spec["work"]) / "fastkd-out"
    argv = [*spec["fastkd_argv"], "--student", spec["student"], "--teacher", spec["teacher"], "--eval-every",
            str(spec["eval_every"]), "--log-every", "1", "--output-dir", str(out), "--no-progress",
            "--latency-runs", "1", *spec.get("extra_argv", [])]
    if main(argv) != 0:
        raise SystemExit("fastkd.train failed")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    evals = [{"step": r["step"], "stage": r["stage"], "train_s": r["train_s"], "dev_acc": r["dev_acc"],
              "eval_s": r["eval_s"]} for r in records if r.get("event") == "eval" and "dev_acc" in r]
    losses = [r["loss"] for r in records if "loss" in r and r.get("event") is None]
    stages, start = [], 0.0
    result = json.loads((out / "result.json").read_text()) if (out / "result.json").exists() else {}
    for name in dict.fromkeys(e["stage"] for e in evals):
        end = [e for e in evals if e["stage"] == name][-1]["train_s"]
        stages.append({"name": name, "samples": spec["train_examples"], "train_s": end - start})
        start = end
    return {"evals": evals, "stages": stages, "losses": losses, "fastkd_result": result}


# ---------------------------------------------------------------- TextBrewer


class ScoreHooks:
    """Pre-softmax attention scores Q·Kᵀ/√d of chosen BERT layers, from forward hooks on their query and key
    projections (what a TextBrewer user writes for TinyBERT's attention loss)."""

    def __init__(self, model, layers: list[int]):
        self.out: dict[tuple[int, str], torch.Tensor] = {}
        cfg = model.config
        self.heads, self.dim = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads
        self.layers = layers
        for i in layers:
            attn = model.bert.encoder.layer[i].attention.self
            for name in ("query", "key"):
                getattr(attn, name).register_forward_hook(self._hook(i, name))

    def _hook(self, i: int, name: str):
        def hook(module, inputs, output):
            self.out[(i, name)] = output
        return hook

    def scores(self) -> list[torch.Tensor]:
        maps = []
        for i in self.layers:
            q, k = self.out[(i, "query")], self.out[(i, "key")]
            B, L, _ = q.shape
            q = q.view(B, L, self.heads, self.dim).transpose(1, 2)
            k = k.view(B, L, self.heads, self.dim).transpose(1, 2)
            maps.append(q @ k.transpose(-1, -2) / math.sqrt(self.dim))
        return maps


def _grouped_adamw(model, lr: float, weight_decay: float):
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": rest, "weight_decay": 0.0}], lr=lr)


def run_textbrewer(spec: dict) -> dict:
    from textbrewer import DistillationConfig, GeneralDistiller, TrainingConfig
    from transformers import AutoModelForSequenceClassification

    from fastkd.models.teacher import load_model
    from fastkd.recipes import TinyBERTParams, uniform_pairs
    from fastkd.training.engine import lr_lambda

    cfg, tok, data = load_job(spec)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(cfg.seed)
    teacher = load_model(spec["teacher"], head=True).to(device).eval()
    student = AutoModelForSequenceClassification.from_pretrained(spec["student"]).to(device)
    pairs = uniform_pairs(student.config.num_hidden_layers, teacher.config.num_hidden_layers)
    hooks_s, hooks_t = ScoreHooks(student, [i for i, _ in pairs]), ScoreHooks(teacher, [j for _, j in pairs])
    d_s, d_t = student.config.hidden_size, teacher.config.hidden_size
    proj = None if d_s == d_t else ["linear", d_s, d_t, {}]
    matches = [{"layer_T": 0, "layer_S": 0, "feature": "hidden", "loss": "hidden_mse", "weight": 1, "proj": proj}]
    matches += [{"layer_T": j + 1, "layer_S": i + 1, "feature": "hidden", "loss": "hidden_mse", "weight": 1,
                 "proj": proj} for i, j in pairs]
    matches += [{"layer_T": n, "layer_S": n, "feature": "attention", "loss": "attention_mse", "weight": 1}
                for n in range(len(pairs))]

    def inter_adaptor(hooks):
        def adaptor(batch, out):
            return {"hidden": out.hidden_states, "attention": hooks.scores(), "inputs_mask": batch["attention_mask"]}
        return adaptor

    def pred_adaptor(batch, out):
        return {"logits": out.logits}

    p = TinyBERTParams()
    trace = Trace(data["dev"], tok.pad_token_id, device, spec["eval_every"], spec.get("max_train_s"))
    stages = [("intermediate", p.inter_lr, DistillationConfig(intermediate_matches=matches),
               inter_adaptor(hooks_t), inter_adaptor(hooks_s), {"output_hidden_states": True}),
              ("prediction", p.pred_lr, DistillationConfig(temperature=p.temperature, kd_loss_type="ce",
                                                           kd_loss_weight=1.0, hard_label_weight=0.0),
               pred_adaptor, pred_adaptor, {})]
    trace.clock = Stopwatch()  # training starts here, as fastkd's clock starts at its first stage
    for si, (name, lr, dcfg, ad_t, ad_s, model_args) in enumerate(stages):
        batches = stage_batches(data["task"], cfg.batch_size, cfg.seed + si, tok.pad_token_id)
        tcfg = TrainingConfig(device=device, output_dir=str(Path(spec["work"]) / "tb-out"), ckpt_frequency=1)
        Path(tcfg.output_dir).mkdir(parents=True, exist_ok=True)
        distiller = GeneralDistiller(tcfg, dcfg, teacher, student, ad_t, ad_s)
        opt = _grouped_adamw(student, lr, cfg.weight_decay)
        # TextBrewer's way: it builds the scheduler after adding its projections' parameter groups
        sched = {"scheduler_class": torch.optim.lr_scheduler.LambdaLR,
                 "scheduler_args": {"lr_lambda": lr_lambda(len(batches), int(cfg.warmup * len(batches)))}}
        save = distiller.save_and_callback

        def save_paused(*a, _save=save, **k):  # TextBrewer saves the student at each checkpoint: not training
            with trace.clock.paused():
                return _save(*a, **k)

        distiller.save_and_callback = save_paused
        write = distiller.write_loss

        def write_loss(total, step, d=None, _write=write):
            trace.losses.append(float(total))
            return _write(total, step, d)

        distiller.write_loss = write_loss
        first = [True]

        def postprocess(batch, _name=name, _first=first):
            if not _first[0]:  # called before every step but the first: the previous step is done
                trace.stepped(student, _name)
            _first[0] = False
            return batch.model_inputs()

        try:
            with distiller:
                distiller.train(opt, batches, num_epochs=1, max_grad_norm=cfg.max_grad_norm,
                                batch_postprocessor=postprocess, **sched, **model_args)
        except OverBudget:
            trace.end_stage(student, name, trace.step * cfg.batch_size - sum(s["samples"] for s in trace.stages))
            break
        trace.step += 1  # the stage's last step (no batch after it)
        trace.end_stage(student, name, len(data["task"]))
    return trace.result()


# ---------------------------------------------------------------- transformers' Trainer, logit KD


def run_hf_trainer(spec: dict) -> dict:
    from transformers import (
        AutoModelForSequenceClassification,
        DataCollatorWithPadding,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    from fastkd.models.teacher import load_model

    cfg, tok, data = load_job(spec)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    teacher = load_model(spec["teacher"], head=True).to(device).eval()
    student = AutoModelForSequenceClassification.from_pretrained(spec["student"])
    trace = Trace(data["dev"], tok.pad_token_id, device, spec["eval_every"], spec.get("max_train_s"))
    T, alpha = 2.0, 0.5

    class KDTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            labels = inputs.pop("labels")
            out = model(**inputs)
            with torch.no_grad():
                t = teacher(**inputs).logits
            soft = F.kl_div(F.log_softmax(out.logits / T, -1), F.softmax(t / T, -1), reduction="batchmean") * T * T
            loss = alpha * soft + (1 - alpha) * F.cross_entropy(out.logits, labels)
            trace.losses.append(float(loss))
            return (loss, out) if return_outputs else loss

    class Evals(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kw):
            try:
                trace.stepped(model, "kd")
            except OverBudget:
                control.should_training_stop = True

    train = data["task"].select_columns(["input_ids", "label"])
    epochs = spec["hf_epochs"]
    args = TrainingArguments(output_dir=str(Path(spec["work"]) / "hf-out"), per_device_train_batch_size=cfg.batch_size,
                             num_train_epochs=epochs, learning_rate=5e-5, warmup_steps=cfg.warmup,
                             weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm, save_strategy="no",
                             eval_strategy="no", logging_strategy="no", report_to="none", seed=cfg.seed,
                             disable_tqdm=True, use_cpu=device.type == "cpu", bf16=device.type == "cuda")
    trainer = KDTrainer(model=student, args=args, train_dataset=train, data_collator=DataCollatorWithPadding(tok),
                        callbacks=[Evals()])
    trace.clock = Stopwatch()
    trainer.train()
    trace.end_stage(trainer.model, "kd", trainer.state.global_step * cfg.batch_size)
    return trace.result()


def peak_rss_mib() -> float:
    """This process's peak resident memory (VmHWM): its own address space's high-water mark. (getrusage's
    ru_maxrss would also count the parent's memory at the fork that started this process.)"""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


ENGINES = {"fastkd": run_fastkd, "textbrewer": run_textbrewer, "hf-trainer": run_hf_trainer}


def main(path: str) -> None:
    spec = json.loads(Path(path).read_text())
    t0 = time.perf_counter()
    result = ENGINES[spec["engine"]](spec)
    result["process_s"] = time.perf_counter() - t0
    result["peak_rss_mib"] = peak_rss_mib()
    Path(spec["out"]).write_text(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1])
