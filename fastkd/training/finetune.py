"""Fine-tuning a teacher on the task when it has no task head, cached on disk so the next run reuses it.

The cache key is a sha256 over the teacher's identity (config + weights digest), the training data (texts and
labels), the label names and every fine-tuning setting; the folder holds a ``save_pretrained`` model, the
tokenizer and ``fastkd-finetune.json`` (key parts, dev accuracy and the weights' digest, verified at every reuse:
a damaged folder is fine-tuned again). A half-written folder is never reused: the model is saved to a temporary
folder and renamed into place.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from fastkd.cache.store import cache_root
from fastkd.device import native_bf16
from fastkd.digest import data_digest, model_digest, sha256_json
from fastkd.models.teacher import load_model
from fastkd.training.batching import LengthBucketSampler
from fastkd.training.engine import Fit, StepState, adamw, evaluate, fit_stage, warmup_linear


@dataclass
class FinetuneConfig:
    epochs: int = 3
    lr: float = 5e-5
    batch_size: int = 32
    warmup: float = 0.1
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    seed: int = 0
    freeze_word_embeddings: bool = False  # a CPU speed-up: the 30k×d embedding's AdamW update dominates




def finetune_key(teacher_path, data: str, label_names, max_length: int, ft: FinetuneConfig,
                 amp: torch.dtype | None = None) -> str:
    """``amp``: the autocast dtype it trains under (a bf16 fine-tune is another teacher than an fp32 one)."""
    parts = {"teacher": model_digest(teacher_path), "data": data, "labels": list(label_names),
             "max_length": max_length, "settings": asdict(ft), "optimizer": "adamw-fused"}
    if amp is not None:
        parts["amp"] = str(amp).removeprefix("torch.")
    return sha256_json(parts)[:24]


META_FILE = "fastkd-finetune.json"


def _verified(folder: Path, log) -> bool:
    """Is the cached fine-tune in ``folder`` intact (its config and weights match the digest recorded when it
    was written)? A damaged one is removed, and said so, to be fine-tuned again: zeroed weights were reused
    silently and a truncated file failed with a SafetensorError, never rebuilt."""
    meta_file = folder / META_FILE
    if not meta_file.is_file():
        return False
    try:
        meta = json.loads(meta_file.read_text())
        problem = None if meta.get("weights_digest") == model_digest(folder) else (
            "its weights do not match the digest recorded when it was written" if meta.get("weights_digest")
            else "it records no digest of its weights (written by an older fastkd)")
    except (OSError, ValueError) as e:
        problem = f"it is unreadable ({e})"
    if problem is None:
        log(f"teacher: reusing the fine-tuned teacher cached at {folder} (dev acc {meta.get('dev_acc', 'n/a')}, "
            f"weights verified)")
        return True
    log(f"teacher: the fine-tuned teacher cached at {folder} is not intact ({problem}); fine-tuning it again")
    shutil.rmtree(folder, ignore_errors=True)
    return False


def finetune_teacher(teacher_path, tokenizer, train_ds, dev_ds, label_names, *, max_length: int,
                     ft: FinetuneConfig, data_fingerprint: str, device, root: Path | None = None,
                     log=print, progress: bool = False) -> Path:
    """Fine-tune ``teacher_path`` (an encoder, any head) on ``train_ds`` (tokenised, with labels) and return
    the folder of the cached fine-tuned ``*ForSequenceClassification`` model (reused when the key matches).
    ``progress``: the distillation stages' progress bar, for a fine-tune that may take minutes."""

    amp = torch.bfloat16 if native_bf16(device) else None  # a CPU with AVX512-BF16/AMX too: ~1.7x faster
    key = finetune_key(teacher_path, data_fingerprint, label_names, max_length, ft, amp)
    folder = (root or cache_root()) / "teachers" / key
    if _verified(folder, log):
        return folder
    log(f"teacher: {teacher_path} has no {len(label_names)}-label task head; fine-tuning it first "
        f"({ft.epochs} epoch(s), {len(train_ds)} examples, lr {ft.lr:g}); cached at {folder}")
    torch.manual_seed(ft.seed)
    num_labels = len(label_names)
    model = load_model(teacher_path, head=True, num_labels=num_labels, id2label=dict(enumerate(label_names)),
                       label2id={n: i for i, n in enumerate(label_names)},
                       problem_type="regression" if num_labels == 1 else "single_label_classification")
    model.to(device).train()
    if ft.freeze_word_embeddings:
        model.get_input_embeddings().weight.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = adamw(params, ft.lr, ft.weight_decay, decay_vectors=True)
    sampler = LengthBucketSampler(train_ds["length"], ft.batch_size, seed=ft.seed, shuffle=True)
    total = max(1, ft.epochs * len(sampler))
    fit = Fit(model, params, opt, warmup_linear(opt, total, ft.warmup), torch.amp.GradScaler("cuda", enabled=False),
              device, amp=amp, max_grad_norm=ft.max_grad_norm, name="teacher fine-tune", where="teacher fine-tuning",
              progress=progress)
    t0 = time.time()

    def forward(batch, host):
        logits = model(**batch.model_inputs()).logits.float()
        if num_labels == 1:  # a regression head
            loss = F.mse_loss(logits[:, 0], batch.labels.float())
        else:
            loss = F.cross_entropy(logits, batch.labels)
        return loss, {"ce": loss}

    def on_step(state: StepState, values: dict[str, float]) -> None:
        if state.global_step % 50 == 0:
            log(f"  fine-tune step {state.global_step}/{total} loss {values['ce']:.4f} ({time.time() - t0:.0f}s)")

    fit_stage(fit, StepState(), sampler, train_ds, tokenizer.pad_token_id, ft.epochs, forward, on_step=on_step)
    model.eval()
    dev = evaluate(model, dev_ds, 64, device, tokenizer.pad_token_id) if dev_ds is not None else {}
    dev_acc = dev.get("acc", dev.get("pearson"))  # accuracy, or a regression's Pearson
    log(f"teacher: fine-tuned in {time.time() - t0:.0f}s" + "".join(f", dev {k} {v:.4f}" for k, v in dev.items()))
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.to("cpu").save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / META_FILE).write_text(json.dumps(
        {"key": key, "teacher": str(teacher_path), "labels": list(label_names), "settings": asdict(ft),
         "dev_acc": dev_acc, "examples": len(train_ds), "weights_digest": model_digest(tmp)}, indent=1))
    if folder.exists():  # another process finished first; keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        os.replace(tmp, folder)
    return folder


def run_finetune_settings(epochs: int | None, batch_size: int, seed: int, on_cpu: bool) -> FinetuneConfig:
    """The fine-tune of a run's head-less teacher: --finetune-epochs (default 3; on a CPU one epoch at a higher
    lr, with the word embeddings frozen, since their AdamW update dominates there)."""
    return FinetuneConfig(epochs=epochs or (1 if on_cpu else 3), seed=seed, lr=1e-4 if on_cpu else 5e-5,
                          batch_size=batch_size, freeze_word_embeddings=on_cpu)


def finetune_for_run(path, tokenizer, data: dict, label_names, ft: FinetuneConfig, *, max_length: int, device,
                     cache_dir: str | None, log, progress: bool) -> Path:
    """The trainer's fine-tune of a head-less teacher on its run's data (``data["finetune"]`` when
    --finetune-examples chose it, else the students' training data)."""
    train_ds = data.get("finetune", data["task"])
    fp = data_digest(list(train_ds["text"]), list(train_ds["label"]),
                     list(train_ds["text_pair"]) if "text_pair" in train_ds.column_names else None)
    return finetune_teacher(path, tokenizer, train_ds, data.get("dev"), label_names, max_length=max_length, ft=ft,
                            data_fingerprint=fp, device=device, root=Path(cache_dir) if cache_dir else None,
                            log=log, progress=progress)
