"""The Trainer: set-up (every check before training), the recipe's stages, and the final report.

One engine runs every method in :mod:`fastkd.recipes`: a frozen teacher (eval mode, inference mode, SDPA,
fp16/bf16 on CUDA) whose activations are captured with hooks (only what the recipe reads) or read from an
activation cache; a student trained with AMP, AdamW (fused on CUDA), warm-up + linear decay, gradient clipping
and accumulation on length-bucketed, dynamically padded batches (:mod:`fastkd.training.engine`); dev evaluation with
best-checkpoint selection; JSONL metrics and a loss-curve PNG; resumable checkpoints (``--resume`` after kill -9
ends with the same weights as an uninterrupted run); DDP under ``torchrun``.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch
from torch import nn

from fastkd.augment import AugmentSettings
from fastkd.cache.carry import CarriedOutputs, carried_cache, start_carry
from fastkd.cache.choice import cache_bytes, cache_dtype, device_cache_budget, make_cache
from fastkd.cache.store import TeacherCache
from fastkd.config import TrainConfig, run_identity
from fastkd.digest import fingerprint_dataset, fingerprint_tokenizer, model_digest
from fastkd.disk import DiskFullError, save_model_dir
from fastkd.distill.distiller import Distiller
from fastkd.models.families import num_heads
from fastkd.models.teacher import (
    TeacherRunner,
    check_task_head,
    check_tokenizer,
    forward_error,
    has_task_head,
    load_frozen,
    load_model,
    max_positions,
    resolve_model_path,
    teacher_dtype,
)
from fastkd.recipes import Shapes, Stage, build_recipe, describe, make_params
from fastkd.student.make import (
    StudentSettings,
    StudentTokens,
    check_student,
    etd_batches,
    make_student,
    mapped_teacher_layers,
    student_batch,
    student_sizes,
    student_view,
)
from fastkd.training.batching import LengthBucketSampler
from fastkd.training.checkpoint import (
    MetricsLog,
    OutputLock,
    check_output_dir,
    default_output_dir,
    load_newest_intact,
    save_checkpoint,
    set_rng_state,
    write_run_file,
)
from fastkd.training.engine import (
    Fit,
    StepState,
    Stopwatch,
    Throughput,
    adamw,
    autocast_dtype,
    batches_for_epoch,
    evaluate,
    fit_stage,
    init_distributed,
    kernel_precision_note,
    primary_metric,
    steps_per_epoch,
    warmup_linear,
)
from fastkd.training.finetune import finetune_for_run, run_finetune_settings
from fastkd.training.report import RunSummary, finish_run
from fastkd.training.rundata import CPU_MAX_EPOCHS, DataSettings, load_run_data
from fastkd.training.tracking import check_installed, open_trackers


def _task_head(kind: str, mode: str) -> bool:
    """Whether a teacher is loaded with its task head: the fine-tuned teacher of a task run."""
    return kind == "finetuned" and mode == "task"


class Trainer:
    def __init__(self, cfg: TrainConfig, log=None, data=None):
        """``data``: a Dataset or DatasetDict in place of ``cfg.task`` (the run's --task is then its fingerprint:
        a new config, the caller's is left as it was)."""
        self.cfg = cfg if data is None else dataclasses.replace(cfg, task=dataset_label(data))
        cfg = self.cfg
        self.task_data = data
        self.data_settings, self.student_settings = data_settings(cfg), student_settings(cfg)
        self.dist = init_distributed()
        self.device = torch.device(f"cuda:{self.dist.local_rank}" if torch.cuda.is_available() else "cpu")
        self.on_cpu = self.device.type == "cpu"
        self._log = log or print
        self.teacher_calls = 0
        self.cache_stats: list[dict] = []
        self.last_ckpt: Path | None = None
        self.best: dict | None = None
        self.state = StepState()
        self.lock: OutputLock | None = None
        self.teacher_dtype = teacher_dtype(cfg.teacher_dtype, self.device)
        self.amp = autocast_dtype(cfg.amp, self.device)

    def log(self, msg: str):
        if self.dist.main:
            self._log(msg)

    # ------------------------------------------------------------ setup (all checks before any training)

    def setup(self):
        from transformers import AutoConfig, AutoTokenizer

        cfg = self.cfg
        out = Path(self.dist.broadcast(str(cfg.output_dir or default_output_dir(cfg.method, cfg.task))))
        self.out_dir, self.resume = out, cfg.resume
        if self.dist.main:  # rank 0 locks and checks the folder, then writes it
            self.lock = OutputLock(out)
            self.out_dir, self.resume = check_output_dir(out, cfg.resume, run_identity(cfg), self.log)
        check_installed(cfg.report_to)
        self.metrics = MetricsLog(self.out_dir / "metrics.jsonl", enabled=self.dist.main,
                                  trackers=open_trackers(cfg.report_to, self.out_dir, run_identity(cfg)))
        path = resolve_model_path(cfg.teacher)
        if not Path(str(path)).is_dir():
            raise ValueError(f"--teacher: {path} is not a local model folder")
        tconf = AutoConfig.from_pretrained(path)
        positions = max_positions(tconf)
        if positions is not None and cfg.max_length > positions:
            raise ValueError(f"--max-length: expected at most {positions} (the teacher's position embeddings), "
                             f"got {cfg.max_length}")
        (n_s, d_s, h_s), h_t = student_sizes(self.student_settings), num_heads(tconf)
        self.shapes = Shapes(tconf.num_hidden_layers, n_s, tconf.hidden_size, d_s, h_t, h_s)
        # --epochs, else the recipe's (capped on a CPU, but for the epochs a user set with --set)
        params = make_params(cfg.method, cfg.overrides, max_epochs=CPU_MAX_EPOCHS if self.on_cpu else None)
        self.recipe = build_recipe(cfg.method, self.shapes, params, mode=cfg.mode, epochs=cfg.epochs,
                                   augment=cfg.augment)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        check_tokenizer(self.tokenizer, tconf, path)
        # None: the student reads the teacher's tokenizer
        self.student_tok = check_student(self.student_settings, tconf, self.recipe, self.tokenizer)
        # Fingerprint it before any call: a fast tokenizer's serialised state records the last truncation
        # settings, which differ when datasets serves a tokenised split from its cache (no call at all).
        self.tokenizer_fp = fingerprint_tokenizer(self.tokenizer)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        reads = {s.data for s in self.recipe.stages}
        run_data = load_run_data(self.data_settings, self.tokenizer, on_cpu=self.on_cpu, needs_general="general" in
                                 reads, finetunes=not has_task_head(tconf), log=self.log, task_data=self.task_data,
                                 augment_with=path if "augmented" in reads else None, main=self.dist.main,
                                 share=self.dist.broadcast)
        self.data, self.label_names, self.subset_note = run_data.splits, run_data.label_names, run_data.subset_note
        self.student_tokens = self.student_tok and StudentTokens(self.student_tok, self.data, cfg.max_length)
        self._load_teachers(path, tconf)
        self._make_student()
        self.amp = settle_precision(self.module.student, self.device, self.amp, self.teacher_dtype,
                                    amp_auto=cfg.amp == "auto", teacher_auto=cfg.teacher_dtype == "auto", log=self.log)
        if self.dist.main and not self.resume:
            write_run_file(self.out_dir, run_identity(cfg), dataclasses.asdict(cfg), describe(self.recipe))
        self.log("\n".join(filter(None, (describe(self.recipe), kernel_precision_note(self.amp, self.device,
                                                                                       self.module)))))

    @property
    def global_step(self) -> int:
        return self.state.global_step

    def _finetuned_path(self, path: Path) -> Path:
        """The teacher fine-tuned on the task (cached; rank 0 trains it, the others read its path)."""
        finetuned, c = path, self.cfg
        if self.dist.main:
            ft = run_finetune_settings(c.finetune_epochs, c.batch_size, self.data_settings.finetune_seed, self.on_cpu)
            finetuned = finetune_for_run(path, self.tokenizer, self.data, self.label_names, ft,
                                         max_length=c.max_length, device=self.device, cache_dir=c.cache_dir,
                                         log=self.log, progress=c.progress)
        return Path(self.dist.broadcast(str(finetuned)))

    def _load_teachers(self, path: Path, tconf) -> None:
        finetuned = path
        if self.cfg.mode == "task":
            if has_task_head(tconf):
                check_task_head(tconf, self.label_names, self.cfg.task)
            else:
                finetuned = self._finetuned_path(path)
        self.teacher_paths = {"pretrained": path, "finetuned": finetuned}
        self.teachers: dict[str, nn.Module] = {}
        for kind in sorted({s.teacher for s in self.recipe.stages}):
            self.teachers[kind], self.teacher_dtype = load_frozen(
                self.teacher_paths[kind], head=_task_head(kind, self.cfg.mode), dtype=self.teacher_dtype,
                device=self.device, fallback=self.cfg.teacher_dtype == "auto", log=self.log)
        self.teacher_digest = {k: model_digest(p) for k, p in self.teacher_paths.items()}

    def _make_student(self) -> None:
        cfg = self.cfg
        kind = "finetuned" if "finetuned" in self.teachers else "pretrained"
        src32 = self.teachers[kind] if self.teacher_dtype == torch.float32 or self.student_settings.path else \
            load_model(self.teacher_paths[kind], head=_task_head(kind, cfg.mode))
        batches = etd_batches(self.data["task"] if cfg.mode == "task" else self.data["general"], cfg.batch_size,
                              self.pad_id, cfg.seed)
        student, kept_hidden = make_student(
            src32.to(self.device), self.student_settings, data=batches, log=self.log,
            num_batches=16 if self.on_cpu else 64,
            layers=mapped_teacher_layers(self.recipe, self.shapes.student_layers, self.shapes.teacher_layers))
        del src32  # ETD's fp32 copy, freed before the Distiller moves (a --student reads the config: none loaded)
        names = {k: f"the {k} teacher ({self.teacher_paths[k]})" for k in self.teachers}
        self.module = Distiller(self.teachers, student, self.recipe, kept_hidden=kept_hidden,
                                teacher_names=names).to(self.device)
        self.model = self.module
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.model = DDP(self.module, device_ids=[self.dist.local_rank] if not self.on_cpu else None,
                             find_unused_parameters=True)

    # ------------------------------------------------------------ the teacher's activations

    def make_cache(self, stage: Stage, fields: list[str]):
        cfg = self.cfg
        data = self.data[stage.data]

        def disk_key():
            return TeacherCache.make_key(teacher=self.teacher_digest[stage.teacher], data=fingerprint_dataset(data),
                                         tokenizer=self.tokenizer_fp, max_length=cfg.max_length,
                                         dtype=str(self.teacher_dtype), fields=fields)

        dtype, labels = cache_dtype(self.teacher_dtype), len(self.label_names or [])  # logits: one per label
        return make_cache(cfg.cache, epochs=stage.epochs, fields=fields, lengths=data["length"], device=self.device,
                          dtype=dtype, ddp=self.dist.enabled, budget=device_cache_budget(self.device),
                          need_bytes=lambda: cache_bytes(data["length"], fields, self.shapes.teacher_hidden, labels,
                                                         dtype),
                          disk_key=disk_key, root=Path(cfg.cache_dir) / "activations" if cfg.cache_dir else None,
                          rank=self.dist.rank, log=self.log, stage=stage.name)

    # ------------------------------------------------------------ training

    def _resume(self) -> dict | None:
        if not self.resume:
            return None
        path, ckpt = load_newest_intact(self.out_dir, self.log)
        if path is None:
            self.log(f"resume: no checkpoint in {self.out_dir}; starting from the beginning")
            self.metrics.truncate(0)
            return None
        self.module.load_state_dict(ckpt["model"])
        self.last_ckpt = path
        self.metrics.truncate(ckpt["global_step"])
        self.log(f"resume: from {path} (stage {ckpt['stage'] + 1}, epoch {ckpt['epoch'] + 1}, "
                 f"step {ckpt['global_step']})")
        return ckpt

    def train(self) -> dict:
        ckpt = self._resume()
        self.best = ckpt["best"] if ckpt else None
        self.state = StepState(global_step=ckpt["global_step"] if ckpt else 0)
        self.clock = Stopwatch()  # training time without evaluations and checkpoints (eval records' train_s)
        self.carry = CarriedOutputs.from_state(ckpt["carry"]) if ckpt and ckpt.get("carry") else None
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp == torch.float16)
        torch.manual_seed(self.cfg.seed + self.dist.rank)
        heads = [i for i, s in enumerate(self.recipe.stages) if s.trains_head]
        self.last_head_stage = heads[-1] if heads else None
        for si in range(ckpt["stage"] if ckpt else 0, len(self.recipe.stages)):
            self._train_stage(si, ckpt)
            ckpt = None
        return {"best": self.best}

    def _train_stage(self, si: int, ckpt: dict | None) -> None:
        cfg, stage = self.cfg, self.recipe.stages[si]
        fields = self.module.teacher_fields(stage)
        data = self.data[stage.data]
        cache = carried_cache(self.carry, fields, len(data), stage.name, self.log) or self.make_cache(stage, fields)
        self.module.set_stage(si, cache=cache)
        runner = self.module.runner
        nxt = self.recipe.stages[si + 1] if si + 1 < len(self.recipe.stages) else None
        if nxt is not None and self.cfg.cache != "off" and not self.dist.enabled:  # DDP: each rank sees a shard
            self.carry = start_carry(self.carry, runner, stage, nxt, self.module.teacher_fields(nxt),
                                     len(self.data[nxt.data]), self.teacher_dtype, self.log)
        if stage.needs_labels and "label" not in data.column_names:
            raise ValueError(f"stage {stage.name}: needs labels but its data has none")
        sampler = LengthBucketSampler(data["length"], cfg.batch_size, seed=cfg.seed + si, shuffle=True,
                                      rank=self.dist.rank, world_size=self.dist.world_size)
        total = steps_per_epoch(sampler, cfg.grad_accum) * stage.epochs
        params = [p for p in self.module.parameters() if p.requires_grad]
        opt = adamw(params, stage.lr, cfg.weight_decay)
        fit = Fit(self.model, list(self.module.parameters()), opt, warmup_linear(opt, total, cfg.warmup),
                  self.scaler, self.device, self.dist, self.amp, cfg.grad_accum, cfg.max_grad_norm, stage.name,
                  f"stage {stage.name}", cfg.progress,
                  last_good=lambda: str(self.last_ckpt or "none (no checkpoint written yet)"))
        self.state.epoch, self.state.stage_step, resume_sampler = 0, 0, None
        if ckpt is not None:  # the resumed stage: restore its optimizer state unless it had not started
            if ckpt["stage_step"] or ckpt["epoch"] or ckpt["sampler"] is not None:
                opt.load_state_dict(ckpt["optimizer"])
                fit.sched.load_state_dict(ckpt["scheduler"])
                self.scaler.load_state_dict(ckpt["scaler"])
            self.state.epoch, self.state.stage_step, resume_sampler = ckpt["epoch"], ckpt["stage_step"], ckpt["sampler"]
            set_rng_state(ckpt["rng"])
            refill_lost_cache(cache, self.module, sampler, data, self.pad_id, self.device, ckpt, self.log)
        self.log(f"stage {si + 1}/{len(self.recipe.stages)} {stage.name}: {stage.epochs} epoch(s) x "
                 f"{steps_per_epoch(sampler, cfg.grad_accum)} steps, {len(data)} examples ({stage.data} data, "
                 f"{stage.teacher} teacher)")
        loop = StageLoop(self, si, fit, sampler, cache, total)
        fit_stage(fit, self.state, sampler, data, self.pad_id, stage.epochs, loop.forward, on_step=loop.on_step,
                  on_epoch_end=loop.on_epoch_end, resume_sampler=resume_sampler,
                  num_workers=2 if self.device.type == "cuda" else 0)
        self._close_stage(stage, cache, runner)

    def _close_stage(self, stage: Stage, cache, runner: TeacherRunner) -> None:
        self.teacher_calls += runner.calls
        if cache is None:
            return
        flush_cache(cache, self.last_ckpt)
        st = dict(cache.stats)
        st.update(stage=stage.name, teacher_forwards=runner.calls)
        self.cache_stats.append(st)
        self.log(f"teacher cache ({st['mode']}) for {stage.name}: {st.get('bytes', 0) / 2**20:.1f} MiB, "
                 f"hit rate {st.get('hit_rate', 0):.2f}, live teacher forwards {runner.calls}"
                 + (f"; {st['note']}" if st.get("note") else ""))
        self.metrics.write({"step": self.state.global_step, "stage": stage.name, "event": "cache", **st})

    # ------------------------------------------------------------ checkpoints and evaluation

    def _ckpt_state(self, si: int, fit: Fit, sampler, consumed: int | None = None) -> dict:
        s = self.state
        return {"stage": si, "epoch": s.epoch, "global_step": s.global_step, "stage_step": s.stage_step,
                "sampler": sampler.state_dict(consumed) if sampler is not None else None,
                "optimizer": fit.opt.state_dict(), "scheduler": fit.sched.state_dict(),
                "scaler": fit.scaler.state_dict(), "best": self.best,
                "carry": self.carry.state_dict() if self.carry is not None else None}

    def _save(self, state: dict, tag: str) -> None:
        """Write a checkpoint (verified finite first, see save_checkpoint) on the main rank."""
        if self.dist.main:
            state = {**state, "model": self.module.state_dict(), "tag": tag}
            self.last_ckpt = save_checkpoint(self.out_dir, state, self.cfg.keep_checkpoints, self.last_ckpt)

    def _evaluate(self, si: int, stage: Stage, where: str) -> None:
        """Dev evaluation (best-student selection in the last stage that trains the head), its time kept out of
        the training clock; the record holds train_s, the training time so far."""
        epoch, train_s = self.state.epoch, self.clock.train_s
        rec = {"step": self.state.global_step, "stage": stage.name, "epoch": epoch, "event": "eval",
               "train_s": round(train_s, 3)}
        student = self.module.student
        t0 = time.perf_counter()
        if self.data.get("dev") is not None and hasattr(student, "classifier"):
            dev, pad = student_view(self.student_tokens, self.data, "dev", self.pad_id)
            metrics = evaluate(student, dev, 64, self.device, pad)
            key = f"dev_{primary_metric(metrics)}"
            rec.update({f"dev_{k}": v for k, v in metrics.items()})
            self.log(f"stage {stage.name} {where}: " + ", ".join(f"dev {k} {v:.4f}" for k, v in metrics.items()))
            if si == self.last_head_stage and (self.best is None or rec[key] > self.best[key]):
                self.best = {key: rec[key], "stage": stage.name, "epoch": epoch, "step": self.state.global_step}
                if self.dist.main:
                    save_model_dir(self.out_dir / "best", student, self.student_tok or self.tokenizer,
                                   kept=f"the last good checkpoint is {self.last_ckpt}")
                rec["best"] = True
        rec["eval_s"] = round(time.perf_counter() - t0, 3)
        self.metrics.write(rec)

    def _end_epoch(self, si: int, stage: Stage, fit: Fit) -> None:
        epoch = self.state.epoch
        with self.clock.paused():
            self._evaluate(si, stage, f"epoch {epoch + 1}")
            # The epoch-end checkpoint resumes at the next epoch (or the next stage).
            st = self._ckpt_state(si, fit, None)
            st.update(epoch=epoch + 1, sampler=None)
            if epoch + 1 >= stage.epochs:
                st.update(stage=si + 1, epoch=0, stage_step=0)
            self._save(st, "epoch")

    def finish(self, t_start: float) -> dict:
        c = self.cfg
        return finish_run(RunSummary(
            out_dir=self.out_dir, student=self.module.student, main=self.dist.main, best=self.best,
            device=self.device, tokenizer=self.student_tok or self.tokenizer,
            teacher_path=self.teacher_paths["finetuned" if "finetuned" in self.teachers else "pretrained"],
            data=self.data, pad_id=self.pad_id,
            student_tokens=self.student_tokens, teacher_forwards=self.teacher_calls, cache_stats=self.cache_stats,
            global_step=self.state.global_step, mode=c.mode, latency_runs=c.latency_runs,
            keep_checkpoints=c.keep_run_checkpoints, cache_dir=c.cache_dir, metrics=self.metrics, log=self.log),
            t_start)

    def close(self, discard: bool = False) -> None:
        """Release the output folder; ``discard``: a failure before training, so the folders it made go too."""
        if getattr(self, "metrics", None) is not None:
            self.metrics.close()
        if self.lock is not None:
            self.lock.discard() if discard else self.lock.release()


class StageLoop:
    """What one stage's step loop calls back (fastkd.training.engine.fit_stage): the forward (teacher outside DDP, then
    the student's losses), what follows each optimizer step (the kinds' after-step hooks, the metrics line, a
    step checkpoint) and each epoch (the disk cache's shards shared, dev evaluation, the epoch checkpoint)."""

    def __init__(self, tr: Trainer, si: int, fit: Fit, sampler: LengthBucketSampler, cache, total: int):
        self.tr, self.si, self.fit, self.sampler, self.cache, self.total = tr, si, fit, sampler, cache, total
        self.stage = tr.recipe.stages[si]
        self.throughput = Throughput()
        self.steps_per_epoch = max(1, total // max(1, self.stage.epochs))
        self.fills_carry = tr.carry is not None and tr.carry.source == self.stage.name

    def forward(self, batch, host):
        tr = self.tr
        # The teacher runs outside DDP's forward (its cache look-up reads the host copy of the batch).
        teacher = tr.module.teacher_outputs(batch, host)
        if self.fills_carry:
            tr.carry.put(host.index, host.attention_mask.sum(1), teacher)
        out = tr.model(*student_batch(tr.student_tokens, batch), batch.labels, teacher_outputs=teacher)
        return out.loss, out.terms

    def on_step(self, state: StepState, terms: dict[str, float]) -> None:
        tr, cfg = self.tr, self.tr.cfg
        tr.module.after_step(tr.dist)
        if state.global_step % cfg.log_every == 0 or state.stage_step == self.total:
            tr.metrics.write({"step": state.global_step, "stage": self.stage.name, "epoch": state.epoch,
                              "loss": sum(terms.values()), **{f"loss_{k}": v for k, v in terms.items()},
                              "lr": self.fit.sched.get_last_lr()[0],
                              "samples_per_s": self.throughput.rate(state.samples, tr.dist.world_size),
                              **tr.module.record()})
            state.samples = 0
        # --eval-every: on a schedule over all stages (an epoch's last step is evaluated by its epoch end); before a
        # step checkpoint of the same step, so the checkpoint holds the best student that evaluation chose
        if cfg.eval_every and state.global_step % cfg.eval_every == 0 and state.stage_step % self.steps_per_epoch:
            with tr.clock.paused():
                tr._evaluate(self.si, self.stage, f"step {state.global_step}")
        if cfg.save_every and state.global_step % cfg.save_every == 0:
            with tr.clock.paused():
                tr._save(tr._ckpt_state(self.si, self.fit, self.sampler, consumed=state.consumed), "step")

    def on_epoch_end(self, state: StepState) -> None:
        tr = self.tr
        if self.cache is not None and tr.cfg.cache == "disk":
            # Ranks see different examples each epoch: share what each stored through the disk shards.
            flush_cache(self.cache, tr.last_ckpt)
            tr.dist.barrier()
            self.cache.refresh()
        tr._end_epoch(self.si, self.stage, self.fit)
        self.throughput.rate(0, 1)


def settle_precision(student: nn.Module, device: torch.device, amp: torch.dtype | None, teacher: torch.dtype, *,
                     amp_auto: bool, teacher_auto: bool, log) -> torch.dtype | None:
    """The student's autocast dtype: --amp auto's choice (``amp_auto``) unless the student's modelling code fails
    under it (transformers' DeBERTa v1 overflows a bf16 mask fill), then none, said in the log; on a CPU with
    --teacher-dtype auto (``teacher_auto``), why the run computes in what it does."""
    if amp_auto and amp is not None and (err := forward_error(student, device, amp)):
        log(f"precision: the student ({student.config.model_type}) fails under {str(amp).removeprefix('torch.')} "
            f"autocast here ({err}); it trains in fp32")
        amp = None
    if device.type == "cpu" and teacher_auto:
        log(cpu_precision_note(teacher, amp))
    return amp


def cpu_precision_note(teacher: torch.dtype, amp: torch.dtype | None) -> str:
    """Why a CPU run's teacher and student compute in what they do (--teacher-dtype auto, --amp auto)."""
    if teacher == torch.bfloat16:
        return ("precision: this CPU computes bf16 natively (AVX512-BF16/AMX), so the teacher runs in bf16 and the "
                f"student under {'bf16 autocast' if amp == torch.bfloat16 else 'no autocast (--amp)'} (TinyBERT on "
                "SST-2 1.26x faster than fp32 on a 2-core CPU); the losses and the optimizer stay fp32 "
                "(--teacher-dtype fp32 --amp off for fp32)")
    return ("precision: fp32 teacher and student (this CPU has no native bf16, and fp16 or emulated bf16 matmuls "
            "are slower than fp32 on CPUs)")


def data_settings(cfg: TrainConfig) -> DataSettings:
    """What the run reads, from its options."""
    return DataSettings(cfg.task, cfg.mode, cfg.dev, cfg.test, cfg.general_corpus, cfg.text_column, cfg.label_column,
                        cfg.text_pair_column, cfg.max_length, cfg.max_train_examples, cfg.max_dev_examples,
                        cfg.finetune_examples, cfg.epochs is not None, cfg.seed,
                        cfg.seed if cfg.finetune_seed is None else cfg.finetune_seed,
                        AugmentSettings(cfg.augment_copies, cfg.augment_candidates, cfg.augment_p, cfg.augment_mlm,
                                        cfg.augment_embeddings, cfg.seed) if cfg.augment != "off" else None)


def student_settings(cfg: TrainConfig) -> StudentSettings:
    """The run's student, from its options."""
    return StudentSettings(cfg.student, cfg.etd, cfg.student_layers, cfg.student_hidden, cfg.student_heads,
                           cfg.student_ffn, cfg.seed)


def refill_lost_cache(cache, module, sampler, data, pad_id: int, device: torch.device, ckpt: dict, log) -> None:
    """A resumed stage's in-memory activation cache died with the killed process. The uninterrupted run filled
    it during the stage's first epoch, batch by batch, and read it back in later epochs; a resumed run that ran
    the teacher live on a later epoch's batches (other batch mates, other padding) got other last bits (37
    tensors 1 ulp off at the end). So the cache is refilled as the first epoch filled it: the teacher over that
    epoch's batches, in order, as far as the killed run got through them. A disk cache survives: nothing to do."""
    if cache is None or getattr(cache, "mode", None) == "disk":
        return
    n = len(sampler) if ckpt["epoch"] > 0 else (ckpt["sampler"] or {}).get("batches_done", 0)
    if not n:
        return
    sampler.set_epoch(0)
    for _, batch in zip(range(n), batches_for_epoch(sampler, data, pad_id), strict=False):
        module.teacher_outputs(batch.to(device), batch)
    log(f"resume: refilled the in-memory teacher cache over the stage's first {n} batches of epoch 1, as the "
        f"killed run had filled it")


def flush_cache(cache, last_ckpt: Path | None) -> None:
    """Write the cache's pending shard; a full disk stops the run saying which checkpoint it can resume from."""
    try:
        cache.flush()
    except DiskFullError as e:
        raise DiskFullError(e.errno, f"{e.strerror}; the run stopped before this epoch's checkpoint, the last good "
                            f"one is {last_ckpt or 'none (none written yet)'}") from e


def dataset_label(data) -> str:
    """What --task says of a Dataset/DatasetDict given in code: its kind and fingerprint(s)."""
    import datasets

    if isinstance(data, datasets.DatasetDict):
        return "datasetdict-" + "-".join(f"{k}.{v._fingerprint}" for k, v in sorted(data.items()))
    if isinstance(data, datasets.Dataset):
        return f"dataset-{data._fingerprint}"
    raise ValueError(f"data: expected a datasets.Dataset or DatasetDict, got {type(data).__name__}")


def run(cfg: TrainConfig, log=print, data=None) -> dict:
    """Set up (every check before training), train, evaluate and save; returns the final metrics. ``data``: a
    ``datasets.Dataset`` or ``DatasetDict`` (train / validation / test splits) in place of ``cfg.task``."""
    t0 = time.time()
    trainer = Trainer(cfg, log, data)
    try:
        try:
            trainer.setup()
        except BaseException:
            trainer.close(discard=True)
            raise
        trainer.train()
        result = trainer.finish(t0)
    finally:
        trainer.close()
    result["trainer"] = trainer
    return result
