"""The Trainer: set-up (every check before training), the stages' training, and the final report.

One engine runs every method in :mod:`fastkd.recipes`: a frozen teacher (eval mode, inference mode, SDPA,
fp16/bf16 on CUDA) whose activations are captured with hooks (only what the recipe reads) or read from a
:class:`fastkd.cache.TeacherCache`; a student trained with AMP, AdamW (fused on CUDA), warm-up + linear decay,
gradient clipping and accumulation on length-bucketed, dynamically padded batches; dev evaluation with best-
checkpoint selection; JSONL metrics and a loss-curve PNG; resumable checkpoints (``--resume`` after kill -9
ends with the same weights as an uninterrupted run); DDP under ``torchrun``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fastkd.batching import LengthBucketSampler
from fastkd.cache import TeacherCache, fingerprint_dataset, fingerprint_tokenizer
from fastkd.checkpoint import _IDENTITY, RUN_FILE, _atomic_save, _rng_state, _set_rng_state, latest_checkpoint
from fastkd.config import CPU_DEV_EXAMPLES, CPU_MAX_EPOCHS, CPU_TRAIN_EXAMPLES, TrainConfig
from fastkd.data import TASKS, load_texts, tokenize
from fastkd.device_cache import DeviceCache
from fastkd.engine import NonFiniteLossError, batches_for_epoch, evaluate, init_distributed, lr_lambda
from fastkd.recipes import Shapes, Stage, build_recipe, capture_plan, describe, make_params
from fastkd.report import cpu_latency_ms, plot_losses
from fastkd.student import _has_task_head, count_params, etd_batches, make_student, mapped_teacher_layers
from fastkd.teacher import TeacherRunner
from fastkd.terms import DistillModule, plan_fields, seq_dim

_STEP_DELAY = float(os.environ.get("FASTKD_STEP_DELAY", "0") or 0)  # seconds after each step (tests only)


class Trainer:
    def __init__(self, cfg: TrainConfig, log=None):
        self.cfg = cfg
        self.dist = init_distributed()
        self.device = torch.device(f"cuda:{self.dist.local_rank}" if torch.cuda.is_available() else "cpu")
        self.on_cpu = self.device.type == "cpu"
        self._log = log or print
        self.metrics_file = None
        self.teacher_calls = 0
        self.cache_stats: list[dict] = []
        self.last_ckpt: Path | None = None

    def log(self, msg: str):
        if self.dist.main:
            self._log(msg)

    # ------------------------------------------------------------ setup (all checks before any training)

    def _dtype(self) -> torch.dtype:
        name = self.cfg.teacher_dtype
        if name == "auto":
            return torch.float32 if self.on_cpu else torch.float16
        return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]

    def _amp(self):
        a = self.cfg.amp
        if a == "off" or (a == "auto" and self.on_cpu):
            return None
        if a == "auto":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return {"bf16": torch.bfloat16, "fp16": torch.float16}[a]

    def _prepare_output(self):
        cfg = self.cfg
        if cfg.output_dir is None:
            cfg.output_dir = str(Path("runs") / f"{cfg.method}-{Path(cfg.task).stem}-{time.strftime('%Y%m%d-%H%M%S')}")
        out = Path(cfg.output_dir)
        run_file = out / RUN_FILE
        mine = {k: getattr(cfg, k) for k in _IDENTITY}
        if not self.dist.main:  # rank 0 checks (and then writes) the folder
            return out, mine
        if cfg.resume and not run_file.is_file() and not (out.exists() and any(out.iterdir())):
            self.log(f"resume: {out} holds no run yet (killed before its first checkpoint?); starting it")
            cfg.resume = False
        if cfg.resume:
            if not run_file.is_file():
                raise ValueError(f"--resume: {out} holds files but no run to resume (no {RUN_FILE}); choose the "
                                 f"run's own --output-dir")
            saved = json.loads(run_file.read_text())["identity"]
            diff = {k: (saved.get(k), v) for k, v in json.loads(json.dumps(mine)).items() if saved.get(k) != v}
            if diff:
                raise ValueError(f"--resume: {out} holds a different run; settings differ: "
                                 + ", ".join(f"{k} (saved {a!r}, now {b!r})" for k, (a, b) in diff.items()))
        elif out.exists() and any(out.iterdir()):
            what = "another run" if run_file.is_file() else "other files"
            if run_file.is_file():
                saved = json.loads(run_file.read_text())
                what = f"another run (method {saved['identity'].get('method')}, started {saved.get('started')})"
            raise ValueError(f"--output-dir: {out} already holds {what}; pass --resume to continue it or choose "
                             f"an empty/new --output-dir")
        return out, mine

    def _load_texts(self, source: str, split: str, *, general: bool = False):
        """``source``'s split; --text-column / --label-column / --text-pair-column name a data file's columns (a
        general corpus is read as single texts without labels, so it is asked for the text column only)."""
        return load_texts(source, split, text_column=self.cfg.text_column,
                          label_column=None if general else self.cfg.label_column,
                          text_pair_column=None if general else self.cfg.text_pair_column)

    def _load_task_data(self, tokenizer):
        """Train, dev and test data: --dev/--test when given, else the task's own splits (a task name's, or a
        folder's <split> files); with no dev split a fixed slice of train is held out for model selection, so the
        test split stays unseen."""
        from fastkd.data import DataNotFoundError, has_splits

        cfg = self.cfg
        splits = has_splits(cfg.task)
        train = self._load_texts(cfg.task, "train")
        if "label" not in train.column_names:
            raise ValueError(f"--task: {cfg.task} has no labels; task mode needs labelled data "
                             f"(use --mode general for unlabelled text)")
        dev = test = None
        if cfg.dev:
            dev = self._load_texts(cfg.dev, "dev")
        elif splits:
            with contextlib.suppress(DataNotFoundError):  # AG News ships train/test only
                dev = self._load_texts(cfg.task, "dev")
        if dev is None and len(train) >= 2:
            held = train.train_test_split(test_size=max(1, min(1000, len(train) // 10)), seed=0)
            train, dev = held["train"], held["test"]
            self.log(f"data: no dev split for {cfg.task} (pass --dev to name one); holding out {len(dev)} train "
                     f"examples as dev")
        if cfg.test:
            test = self._load_texts(cfg.test, "test")
        elif cfg.task in TASKS:
            test = self._load_texts(cfg.task, "test")  # a named task's test split must exist
        elif splits:
            try:
                test = self._load_texts(cfg.task, "test")
            except DataNotFoundError:
                self.log(f"data: no test split in {cfg.task} (pass --test to name one); the report gives no test "
                         f"accuracy")
        from fastkd.data import label_names

        names = list(TASKS[cfg.task].labels) if cfg.task in TASKS else label_names(train)
        n_labels = len(names) if names else int(max(train["label"])) + 1
        names = names or [str(i) for i in range(n_labels)]
        for split_name, ds in (("train", train), ("dev", dev), ("test", test)):
            if ds is not None and "label" in ds.column_names and len(ds):
                lo, hi = min(ds["label"]), max(ds["label"])
                if lo < 0 or hi >= n_labels:
                    raise ValueError(f"data: {split_name} labels span {lo}..{hi}, expected 0..{n_labels - 1} "
                                     f"({names})")
        return train, dev, test, names

    @property
    def finetune_seed(self) -> int:
        return self.cfg.seed if self.cfg.finetune_seed is None else self.cfg.finetune_seed

    def _subset(self, ds, n: int | None, seed: int):
        if n is None or n >= len(ds):
            return ds
        return ds.shuffle(seed=seed).select(range(n))

    def setup(self):
        from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification, AutoTokenizer

        from fastkd.finetune import FinetuneConfig, data_digest, finetune_teacher, model_digest
        from fastkd.models import resolve_model_path

        cfg = self.cfg
        self.out_dir, identity = self._prepare_output()
        teacher_path = resolve_model_path(cfg.teacher)
        if not Path(str(teacher_path)).is_dir():
            raise ValueError(f"--teacher: {teacher_path} is not a local model folder")
        tconf = AutoConfig.from_pretrained(teacher_path)
        positions = getattr(tconf, "max_position_embeddings", None)
        if positions is not None:
            if tconf.model_type in ("roberta", "xlm-roberta", "camembert"):  # positions start after the pad id
                positions -= (tconf.pad_token_id or 0) + 1
            if cfg.max_length > positions:
                raise ValueError(f"--max-length: expected at most {positions} (the teacher's position embeddings), "
                                 f"got {cfg.max_length}")
        shapes = Shapes(tconf.num_hidden_layers, cfg.student_layers, tconf.hidden_size, cfg.student_hidden,
                        tconf.num_attention_heads, cfg.student_heads)
        params = make_params(cfg.method, cfg.overrides)
        self.recipe = build_recipe(cfg.method, shapes, params, mode=cfg.mode)  # mapping errors raise here
        if cfg.epochs is not None:
            for s in self.recipe.stages:
                s.epochs = cfg.epochs
        elif self.on_cpu:
            for s in self.recipe.stages:
                s.epochs = min(s.epochs, CPU_MAX_EPOCHS)
        self.shapes = shapes
        tokenizer = AutoTokenizer.from_pretrained(teacher_path)
        self.tokenizer = tokenizer
        # Fingerprint it before any call: a fast tokenizer's serialised state records the last truncation
        # settings, which differ when datasets serves a tokenised split from its cache (no call at all).
        self.tokenizer_fp = fingerprint_tokenizer(tokenizer)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        # None: the CPU default subset (all data on a GPU); 0: all data, on any device.
        n_train = (cfg.max_train_examples or None) if cfg.max_train_examples is not None else (
            CPU_TRAIN_EXAMPLES if self.on_cpu else None)
        n_dev = (cfg.max_dev_examples or None) if cfg.max_dev_examples is not None else (
            CPU_DEV_EXAMPLES if self.on_cpu else None)
        self.subset_note = ""
        if self.on_cpu:
            parts = []
            if cfg.max_train_examples is None:
                parts.append(f"a {n_train}-example training subset per data source")
            if cfg.max_dev_examples is None:
                parts.append(f"a {n_dev}-example dev subset")
            if cfg.epochs is None:
                parts.append(f"at most {CPU_MAX_EPOCHS} epoch(s) per stage")
            if parts:
                self.subset_note = ("CPU default profile (this machine has no GPU): " + ", ".join(parts)
                                    + "; a GPU run uses the full data and the papers' epochs")
                self.log(self.subset_note)
            if cfg.teacher_dtype == "auto":
                self.log("teacher: fp32 on the CPU (half-precision matmuls are slow on CPUs); fp16 on CUDA")

        # Data (missing data fails here, naming the paths tried).
        needs_general = any(s.data == "general" for s in self.recipe.stages)
        self.data: dict[str, Any] = {}
        names = None
        if cfg.mode == "task":
            train, dev, test, names = self._load_task_data(tokenizer)
            if cfg.finetune_examples is not None and not _has_task_head(tconf):  # only a fine-tune reads it
                n_ft = cfg.finetune_examples or None
                self.data["finetune"] = tokenize(self._subset(train, n_ft, self.finetune_seed), tokenizer,
                                                 cfg.max_length)
                self.log(f"teacher fine-tune data: {len(self.data['finetune'])} training examples "
                         f"(--finetune-examples {cfg.finetune_examples})")
            train = self._subset(train, n_train, cfg.seed)
            dev = self._subset(dev, n_dev, cfg.seed) if dev is not None else None
            self.data["task"] = tokenize(train, tokenizer, cfg.max_length)
            self.data["dev"] = tokenize(dev, tokenizer, cfg.max_length) if dev is not None else None
            self.data["test"] = tokenize(test, tokenizer, cfg.max_length) if test is not None else None
            self.label_names = names
        if needs_general or cfg.mode == "general":
            # --mode general distils on --general-corpus (default: the --task's training texts, labels
            # dropped); ERNIE-Tiny's general stages in task mode default to AG News.
            corpus = cfg.general_corpus or (cfg.task if cfg.mode == "general" else "agnews")
            gen = self._load_texts(corpus, "train", general=True)
            gen = self._subset(gen, n_train, cfg.seed + 1)
            gen = gen.remove_columns([c for c in gen.column_names if c != "text"])
            self.data["general"] = tokenize(gen, tokenizer, cfg.max_length)

        # Teachers.
        pretrained_has_head = _has_task_head(tconf)
        self.teachers: dict[str, nn.Module] = {}
        tdtype = self._dtype()
        finetuned_path = teacher_path
        if cfg.mode == "task":
            if pretrained_has_head:
                t_names = [str(tconf.id2label[i]) for i in sorted(tconf.id2label)]
                named = not any(re.fullmatch(r"LABEL_\d+|\d+", n) for n in t_names + names)
                if tconf.num_labels == len(names) and named and [n.lower() for n in t_names] != [
                        n.lower() for n in names]:
                    raise ValueError(
                        f"--teacher: its task head predicts {t_names} but {cfg.task}'s labels are {names} (in id "
                        f"order); use a teacher fine-tuned on this task or its pretrained encoder")
                if tconf.num_labels != len(names):
                    raise ValueError(
                        f"--teacher: its task head has {tconf.num_labels} labels "
                        f"({list(tconf.id2label.values())}) but {cfg.task} has {len(names)} ({names}); use a "
                        f"teacher fine-tuned on this task or its pretrained encoder (fastkd then fine-tunes it)")
            else:
                # CPU profile: one epoch at a higher lr, word embeddings frozen (their AdamW update dominates).
                ft = FinetuneConfig(epochs=cfg.finetune_epochs or (1 if self.on_cpu else 3),
                                    seed=self.finetune_seed, lr=1e-4 if self.on_cpu else 5e-5,
                                    batch_size=cfg.batch_size,
                                    freeze_word_embeddings=self.on_cpu)
                root = Path(cfg.cache_dir) if cfg.cache_dir else None
                train_ds = self.data.get("finetune", self.data["task"])
                fp = data_digest(list(train_ds["text"]), list(train_ds["label"]),
                                 list(train_ds["text_pair"]) if "text_pair" in train_ds.column_names else None)
                if self.dist.main:
                    finetuned_path = finetune_teacher(teacher_path, tokenizer, train_ds, self.data.get("dev"),
                                                      names, max_length=cfg.max_length, cfg=ft,
                                                      data_fingerprint=fp, device=self.device, root=root,
                                                      log=self.log)
                if self.dist.enabled:
                    import torch.distributed as tdist

                    box = [str(finetuned_path)]
                    tdist.broadcast_object_list(box, src=0)
                    finetuned_path = Path(box[0])
        self.teacher_paths = {"pretrained": teacher_path, "finetuned": finetuned_path}
        for kind in sorted({s.teacher for s in self.recipe.stages}):
            path = self.teacher_paths[kind]
            if kind == "finetuned" and cfg.mode == "task":
                model = AutoModelForSequenceClassification.from_pretrained(path, dtype=tdtype,
                                                                           attn_implementation="sdpa")
            else:
                model = AutoModel.from_pretrained(path, dtype=tdtype, attn_implementation="sdpa")
            model.to(self.device).eval().requires_grad_(False)
            self.teachers[kind] = model
        self.teacher_digest = {k: model_digest(p) for k, p in self.teacher_paths.items()}

        # Student.
        source = self.teachers["finetuned"] if "finetuned" in self.teachers else self.teachers["pretrained"]
        src32 = source if tdtype == torch.float32 else type(source).from_pretrained(
            self.teacher_paths["finetuned" if "finetuned" in self.teachers else "pretrained"],
            dtype=torch.float32, attn_implementation="sdpa")
        etd_ds = self.data["task"] if cfg.mode == "task" else self.data["general"]
        batches = etd_batches(etd_ds, cfg.batch_size, self.pad_id, cfg.seed)
        student, kept_hidden = make_student(
            src32.to(self.device), cfg, data=batches, log=self.log, num_batches=16 if self.on_cpu else 64,
            layers=mapped_teacher_layers(self.recipe, cfg.student_layers, shapes.teacher_layers))
        del src32
        self.module = DistillModule(student, shapes, self.recipe, kept_hidden).to(self.device)
        self.model = self.module
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.model = DDP(self.module, device_ids=[self.dist.local_rank] if not self.on_cpu else None,
                             find_unused_parameters=True)
        if self.dist.main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            if not cfg.resume:
                (self.out_dir / RUN_FILE).write_text(json.dumps(
                    {"identity": identity, "config": dataclasses.asdict(cfg), "started": time.strftime("%c"),
                     "recipe": describe(self.recipe)}, indent=1, default=str))
        self.log(describe(self.recipe))

    # ------------------------------------------------------------ checkpoints

    def save_checkpoint(self, state: dict, tag: str):
        if not self.dist.main:
            return
        ckdir = self.out_dir / "checkpoints"
        ckdir.mkdir(parents=True, exist_ok=True)
        path = ckdir / f"step-{state['global_step']}.pt"
        _atomic_save({**state, "model": self.module.state_dict(), "rng": _rng_state(), "tag": tag}, path)
        self.last_ckpt = path
        ckpts = sorted(ckdir.glob("step-*.pt"), key=lambda p: int(p.stem.split("-")[1]))
        for old in ckpts[:-self.cfg.keep_checkpoints]:
            old.unlink(missing_ok=True)

    # ------------------------------------------------------------ metrics

    def _metric(self, record: dict):
        if not self.dist.main:
            return
        if self.metrics_file is None:
            self.metrics_file = open(self.out_dir / "metrics.jsonl", "a")
        self.metrics_file.write(json.dumps(record) + "\n")
        self.metrics_file.flush()

    def _truncate_metrics(self, step: int):
        """On resume, drop records written after the checkpoint (they will be produced again)."""
        f = self.out_dir / "metrics.jsonl"
        if not f.is_file() or not self.dist.main:
            return
        keep = []
        for line in f.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by the kill
            if rec.get("step", 0) <= step:
                keep.append(line)
        f.write_text("".join(x + "\n" for x in keep))

    # ------------------------------------------------------------ training

    def _device_cache_budget(self) -> int | None:
        """Bytes a device cache may take: half of what is free on the GPU, leaving the student's training room
        (over it, --cache device runs the teacher live and auto picks the host cache); None without a GPU."""
        return int(torch.cuda.mem_get_info(self.device)[0] * 0.5) if self.device.type == "cuda" else None

    def _cache_dtype(self) -> torch.dtype:
        """The cached activations' dtype: bf16 for a bf16 teacher (fp16 cannot hold its range), else fp16."""
        return torch.bfloat16 if self._dtype() == torch.bfloat16 else torch.float16

    def _auto_cache_mode(self, stage: Stage, fields: list[str]) -> str:
        """--cache auto: "device" on a single GPU when the dataset's activations fit the budget, else "memory"."""
        budget = self._device_cache_budget()
        token_fields = [f for f in fields if seq_dim(f) is not None]
        labels = len(getattr(self, "label_names", None) or [])  # logits: one value per label and example
        need = DeviceCache.bytes_needed(self.data[stage.data]["length"], len(token_fields) * self.shapes.teacher_hidden,
                                        (len(fields) - len(token_fields)) * labels, self._cache_dtype())
        # Under DDP each rank meets other examples every epoch (hit rate ~1/world_size): a whole-dataset
        # buffer per GPU would mostly sit unread, so auto stays on the host there.
        mode = "device" if budget is not None and need <= budget and not self.dist.enabled else "memory"
        self.log(f"teacher cache (auto): {mode} for stage {stage.name} ({need / 2**30:.2f} GiB of activations"
                 + (f", GPU budget {budget / 2**30:.1f} GiB)" if budget is not None else "; no GPU)"))
        return mode

    def _make_cache(self, stage_idx: int, stage: Stage, fields: list[str]):
        cfg = self.cfg
        if cfg.cache == "off" or not fields:  # a stage that needs nothing from the teacher (e.g. a fine-tune)
            return None
        mode = cfg.cache
        if mode in ("auto", "memory", "device") and self.dist.enabled and stage.epochs > 1:
            self.log("teacher cache: under DDP each rank sees other examples every epoch, so a memory or device "
                     "cache hits about 1/world_size of the time; use --cache disk to share activations between ranks")
        if mode in ("auto", "memory", "device") and stage.epochs < 2:
            what = "" if mode == "auto" else f"{mode} "
            self.log(f"teacher cache: stage {stage.name} runs one epoch, so a {what}cache would never be read; "
                     f"not storing (use --cache disk to keep activations for later runs)")
            return None
        if mode == "auto":
            mode = self._auto_cache_mode(stage, fields)
        if mode == "device":
            return DeviceCache(self.data[stage.data]["length"], self.device, dtype=self._cache_dtype(),
                               budget_bytes=self._device_cache_budget())
        data_fp = fingerprint_dataset(self.data[stage.data])
        key = TeacherCache.make_key(teacher=self.teacher_digest[stage.teacher], data=data_fp,
                                    tokenizer=self.tokenizer_fp, max_length=cfg.max_length,
                                    dtype=str(self._dtype()), fields=fields)
        root = Path(cfg.cache_dir) / "activations" if cfg.cache_dir else None
        return TeacherCache(mode, root, key, rank=self.dist.rank)

    def train(self) -> dict:
        cfg = self.cfg
        ckpt = None
        if cfg.resume:
            path = latest_checkpoint(self.out_dir)
            if path is not None:
                ckpt = torch.load(path, map_location="cpu", weights_only=False)
                self.module.load_state_dict(ckpt["model"])
                self.last_ckpt = path
                self._truncate_metrics(ckpt["global_step"])
                self.log(f"resume: from {path} (stage {ckpt['stage'] + 1}, epoch {ckpt['epoch'] + 1}, "
                         f"step {ckpt['global_step']})")
            else:
                self.log(f"resume: no checkpoint in {self.out_dir}; starting from the beginning")
                self._truncate_metrics(0)
        self.best = ckpt["best"] if ckpt else None
        self.global_step = ckpt["global_step"] if ckpt else 0
        first_stage = ckpt["stage"] if ckpt else 0
        amp = self._amp()
        scaler = torch.amp.GradScaler("cuda", enabled=amp == torch.float16)
        torch.manual_seed(cfg.seed + self.dist.rank)
        heads = [i for i, s in enumerate(self.recipe.stages) if s.trains_head]
        self.last_head_stage = heads[-1] if heads else None
        for si in range(first_stage, len(self.recipe.stages)):
            stage = self.recipe.stages[si]
            self.module.set_stage(stage)
            fields = plan_fields(capture_plan(stage.terms, "teacher"), self.shapes.teacher_layers)
            cache = self._make_cache(si, stage, fields)
            runner = TeacherRunner(self.teachers[stage.teacher], fields, cache, self.device)
            data = self.data[stage.data]
            if stage.needs_labels and "label" not in data.column_names:
                raise ValueError(f"stage {stage.name}: needs labels but its data has none")
            sampler = LengthBucketSampler(data["length"], cfg.batch_size, seed=cfg.seed + si, shuffle=True,
                                          rank=self.dist.rank, world_size=self.dist.world_size)
            steps_per_epoch = max(1, math.ceil(len(sampler) / cfg.grad_accum))
            total = steps_per_epoch * stage.epochs
            params = [p for p in self.module.parameters() if p.requires_grad]
            opt = torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
                                     {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                                    lr=stage.lr, fused=not self.on_cpu)
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(total, int(cfg.warmup * total)))
            first_epoch, stage_step, resume_sampler = 0, 0, None
            if ckpt is not None:  # the resumed stage: restore its optimizer state unless it had not started
                if ckpt["stage_step"] or ckpt["epoch"] or ckpt["sampler"] is not None:
                    opt.load_state_dict(ckpt["optimizer"])
                    sched.load_state_dict(ckpt["scheduler"])
                    scaler.load_state_dict(ckpt["scaler"])
                first_epoch, stage_step, resume_sampler = ckpt["epoch"], ckpt["stage_step"], ckpt["sampler"]
                _set_rng_state(ckpt["rng"])
                ckpt = None
            self.log(f"stage {si + 1}/{len(self.recipe.stages)} {stage.name}: {stage.epochs} epoch(s) x "
                     f"{steps_per_epoch} steps, {len(data)} examples ({stage.data} data, {stage.teacher} teacher)")
            for epoch in range(first_epoch, stage.epochs):
                sampler.set_epoch(epoch)
                if resume_sampler is not None:
                    sampler.load_state_dict(resume_sampler)
                    resume_sampler = None
                stage_step = self._run_epoch(si, stage, epoch, sampler, data, runner, opt, sched, scaler, amp,
                                             stage_step, total)
                if cache is not None and cfg.cache == "disk":
                    # Ranks see different examples each epoch: share what each stored through the disk shards.
                    cache.flush()
                    if self.dist.enabled:
                        import torch.distributed as tdist

                        tdist.barrier()
                        if hasattr(cache, "refresh"):
                            cache.refresh()
                self._end_epoch(si, stage, epoch, sampler, opt, sched, scaler, stage_step)
            self.teacher_calls += runner.calls
            if cache is not None:
                cache.flush()
                st = dict(cache.stats)
                st.update(stage=stage.name, teacher_forwards=runner.calls)
                self.cache_stats.append(st)
                self.log(f"teacher cache ({st['mode']}) for {stage.name}: {st.get('bytes', 0) / 2**20:.1f} MiB, "
                         f"hit rate {st.get('hit_rate', 0):.2f}, live teacher forwards {runner.calls}"
                         + (f"; {st['note']}" if st.get("note") else ""))
                self._metric({"step": self.global_step, "stage": stage.name, "event": "cache", **st})
            del cache, runner
        return {"best": self.best}

    def _run_epoch(self, si, stage, epoch, sampler, data, runner, opt, sched, scaler, amp, stage_step, total):
        from tqdm import tqdm

        cfg = self.cfg
        # DataLoader workers draw batches ahead, so the resume point is the count this loop consumed.
        consumed = sampler.state_dict()["batches_done"]
        bar = tqdm(total=len(sampler), initial=consumed, desc=f"{stage.name} e{epoch + 1}", file=sys.stderr,
                   disable=not (cfg.progress and self.dist.main), dynamic_ncols=True, unit="batch")
        self.module.train()
        micro, window_samples, t_window = 0, 0, time.perf_counter()
        acc_terms: dict[str, float] = {}
        cuda = self.device.type == "cuda"
        batches = batches_for_epoch(sampler, data, self.pad_id, num_workers=2 if cuda else 0, pin_memory=cuda)
        batch = next(batches, None)
        while batch is not None:
            nxt_batch = None
            consumed += 1
            host, batch = batch, batch.to(self.device, non_blocking=cuda)
            t_out = runner(batch, host)
            # Peek whether this is the epoch's last micro-batch: a partial accumulation window still steps.
            last_micro = (micro + 1) % cfg.grad_accum == 0
            if not last_micro:
                nxt_batch = next(batches, None)
                last_micro = nxt_batch is None
            no_sync = self.dist.enabled and not last_micro
            with self.model.no_sync() if no_sync else contextlib.nullcontext():
                with torch.autocast(self.device.type, dtype=amp or torch.float32, enabled=amp is not None):
                    total_loss, terms = self.model(batch.input_ids, batch.attention_mask, batch.labels, t_out,
                                                   batch.token_type_ids)
                # One device->host transfer per micro-step serves both the NaN/inf check (before backward, so
                # the weights are never touched by a bad step) and the logged running sums.
                values = self._check_finite(terms, stage)
                scaler.scale(total_loss / cfg.grad_accum).backward()
            micro += 1
            window_samples += batch.input_ids.shape[0]
            for k, v in values.items():
                acc_terms[k] = acc_terms.get(k, 0.0) + v / cfg.grad_accum
            bar.update(1)
            if not last_micro:
                batch = nxt_batch
                continue
            micro = 0
            scaler.unscale_(opt)
            if cfg.max_grad_norm > 0:  # clip_grad_norm_ with 0 would zero every gradient, not switch clipping off
                torch.nn.utils.clip_grad_norm_(self.module.parameters(), cfg.max_grad_norm)
            scaler.step(opt)
            scaler.update()
            sched.step()
            opt.zero_grad(set_to_none=True)
            if self.module.has_emd:
                self.module.update_emd_weights(self.dist)
            stage_step += 1
            self.global_step += 1
            if self.global_step % cfg.log_every == 0 or stage_step == total:
                dt = time.perf_counter() - t_window
                rate = window_samples * self.dist.world_size / max(dt, 1e-9)
                rec = {"step": self.global_step, "stage": stage.name, "epoch": epoch,
                       "loss": sum(acc_terms.values()), **{f"loss_{k}": v for k, v in acc_terms.items()},
                       "lr": sched.get_last_lr()[0], "samples_per_s": rate}
                if self.module.has_emd:
                    rec["emd_w_s"] = self.module.emd_w_s.tolist()
                    rec["emd_w_t"] = self.module.emd_w_t.tolist()
                self._metric(rec)
                bar.set_postfix(loss=f"{rec['loss']:.4f}", samples_s=f"{rate:.0f}")
                window_samples, t_window = 0, time.perf_counter()
            acc_terms = {}
            if cfg.save_every and self.global_step % cfg.save_every == 0:
                self.save_checkpoint(self._state(si, epoch, stage_step, sampler, opt, sched, scaler, consumed),
                                     "step")
            if _STEP_DELAY:  # crash-recovery tests slow the run down so a kill lands mid-epoch
                time.sleep(_STEP_DELAY)
            batch = nxt_batch if nxt_batch is not None else next(batches, None)
        bar.close()
        return stage_step

    def _state(self, si, epoch, stage_step, sampler, opt, sched, scaler, consumed: int | None = None) -> dict:
        return {"stage": si, "epoch": epoch, "global_step": self.global_step, "stage_step": stage_step,
                "sampler": sampler.state_dict(consumed) if sampler is not None else None,
                "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "scaler": scaler.state_dict(),
                "best": self.best}

    def _check_finite(self, terms, stage) -> dict[str, float]:
        """The loss terms as floats (one sync for all of them); raises on NaN/inf naming step and term."""
        flat = torch.stack([v.detach().float().reshape(()) for v in terms.values()]).tolist()
        vals = dict(zip(terms, flat, strict=True))
        if all(math.isfinite(v) for v in vals.values()):
            return vals
        bad = {k: v for k, v in vals.items() if not math.isfinite(v)}
        raise NonFiniteLossError(
            f"non-finite loss at step {self.global_step + 1} (stage {stage.name}): term "
            f"{', '.join(f'{k}={v}' for k, v in bad.items())}; last good checkpoint: "
            f"{self.last_ckpt or 'none (no checkpoint written yet)'}")

    def _end_epoch(self, si, stage, epoch, sampler, opt, sched, scaler, stage_step):
        rec = {"step": self.global_step, "stage": stage.name, "epoch": epoch, "event": "eval"}
        student = self.module.student
        if self.data.get("dev") is not None and hasattr(student, "classifier"):
            acc = evaluate(student, self.data["dev"], 64, self.device, self.pad_id)
            rec["dev_acc"] = acc
            self.log(f"stage {stage.name} epoch {epoch + 1}: dev acc {acc:.4f}")
            if si == self.last_head_stage and (self.best is None or acc > self.best["dev_acc"]):
                self.best = {"dev_acc": acc, "stage": stage.name, "epoch": epoch, "step": self.global_step}
                if self.dist.main:
                    student.save_pretrained(self.out_dir / "best")
                rec["best"] = True
        self._metric(rec)
        # The epoch-end checkpoint resumes at the next epoch (or the next stage).
        last_epoch = epoch + 1 >= stage.epochs
        st = self._state(si, epoch, stage_step, sampler, opt, sched, scaler)
        if last_epoch:
            st.update(stage=si + 1, epoch=0, stage_step=0, sampler=None)
        else:
            st.update(epoch=epoch + 1, sampler=None)
        self.save_checkpoint(st, "epoch")

    # ------------------------------------------------------------ finish

    def finish(self, t_start: float) -> dict:
        from transformers import AutoModelForSequenceClassification

        cfg = self.cfg
        student = self.module.student
        final_dir = self.out_dir / "student"
        if self.best is not None and (self.out_dir / "best").is_dir():
            student = type(student).from_pretrained(self.out_dir / "best", dtype=torch.float32).to(self.device)
            self.log(f"student: best dev checkpoint (stage {self.best['stage']}, epoch {self.best['epoch'] + 1}, "
                     f"dev acc {self.best['dev_acc']:.4f})")
        result: dict[str, Any] = {"output_dir": str(self.out_dir), "student_dir": str(final_dir)}
        if not self.dist.main:
            return result
        student.save_pretrained(final_dir)
        self.tokenizer.save_pretrained(final_dir)
        teacher_kind = "finetuned" if "finetuned" in self.teachers else "pretrained"
        t_path = self.teacher_paths[teacher_kind]
        if cfg.mode == "task" and self.data.get("test") is not None:
            teacher32 = AutoModelForSequenceClassification.from_pretrained(t_path, dtype=torch.float32).to(self.device)
            result["teacher_test_acc"] = evaluate(teacher32, self.data["test"], 64, self.device, self.pad_id)
            result["student_test_acc"] = evaluate(student, self.data["test"], 64, self.device, self.pad_id)
            result["test_examples"] = len(self.data["test"])
        else:
            from transformers import AutoModel

            teacher32 = AutoModel.from_pretrained(t_path, dtype=torch.float32)
        # the latency is measured on a median-length example of the data held out from training, when there is any
        ref = next(self.data[k] for k in ("test", "dev", "task", "general") if self.data.get(k) is not None)
        result["teacher_params"] = count_params(teacher32)
        result["student_params"] = count_params(student)
        lengths = sorted(ref["length"])
        median_len = int(lengths[len(lengths) // 2])
        ids = next(r for r in ref if r["length"] == median_len)["input_ids"]
        result["latency_tokens"] = median_len
        result["teacher_latency_ms"] = cpu_latency_ms(teacher32, ids, cfg.latency_runs)
        result["student_latency_ms"] = cpu_latency_ms(student, ids, cfg.latency_runs)
        result["speedup"] = result["teacher_latency_ms"] / result["student_latency_ms"]
        result["teacher_forwards"] = self.teacher_calls
        result["cache"] = self.cache_stats
        result["wall_s"] = time.time() - t_start
        result["best"] = self.best
        (self.out_dir / "result.json").write_text(json.dumps(result, indent=1, default=str))
        self._metric({"step": self.global_step, "event": "final", **{k: v for k, v in result.items()
                                                                     if k != "cache"}})
        plot_losses(self.out_dir / "metrics.jsonl", self.out_dir / "loss.png")
        return result


def run(cfg: TrainConfig, log=print) -> dict:
    """Set up (every check before training), train, evaluate and save; returns the final metrics."""
    t0 = time.time()
    trainer = Trainer(cfg, log)
    trainer.setup()
    trainer.train()
    result = trainer.finish(t0)
    result["trainer"] = trainer
    return result


