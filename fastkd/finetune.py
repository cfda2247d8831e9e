"""Fine-tuning a teacher on the task when it has no task head, cached on disk so the next run reuses it.

The cache key is a sha256 over the teacher's identity (config + weights digest), the training data (texts and
labels), the label names and every fine-tuning setting; the folder holds a ``save_pretrained`` model, the
tokenizer and ``fastkd-finetune.json`` (key parts and dev accuracy). A half-written folder is never reused:
the model is saved to a temporary folder and renamed into place.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from fastkd.batching import LengthBucketSampler
from fastkd.cache import cache_root
from fastkd.engine import batches_for_epoch, evaluate, lr_lambda


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




def model_digest(path: str | Path) -> str:
    """sha256 over a model folder's config and weight files (the teacher's identity)."""
    p = Path(path)
    h = hashlib.sha256()
    files = sorted(f for f in p.iterdir() if f.is_file() and (f.name == "config.json" or f.suffix in
                                                                    (".safetensors", ".bin")))
    if not files:
        raise FileNotFoundError(f"teacher: {p} holds no config.json / weights")
    for f in files:
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()


def data_digest(texts: list[str], labels: list[int] | None, pairs: list[str] | None = None) -> str:
    """sha256 of the examples (texts, second texts of sentence pairs, labels); single texts hash as they always
    did, so cached fine-tunes stay valid."""
    h = hashlib.sha256()
    for i, t in enumerate(texts):
        h.update(t.encode())
        if pairs is not None:
            h.update(b"\x02" + pairs[i].encode())
        h.update(b"\x00" if labels is None else str(int(labels[i])).encode() + b"\x01")
    return h.hexdigest()


def finetune_key(teacher_path, data: str, label_names, max_length: int, cfg: FinetuneConfig) -> str:
    parts = {"teacher": model_digest(teacher_path), "data": data, "labels": list(label_names),
             "max_length": max_length, "settings": asdict(cfg)}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


def _accuracy(model, dataset, batch_size: int, device, pad_id: int) -> float:
    return evaluate(model, dataset, batch_size, device, pad_id)


def finetune_teacher(teacher_path, tokenizer, train_ds, dev_ds, label_names, *, max_length: int,
                     cfg: FinetuneConfig, data_fingerprint: str, device, root: Path | None = None,
                     log=print) -> Path:
    """Fine-tune ``teacher_path`` (an encoder, any head) on ``train_ds`` (tokenised, with labels) and return
    the folder of the cached fine-tuned ``*ForSequenceClassification`` model (reused when the key matches)."""
    from transformers import AutoModelForSequenceClassification


    key = finetune_key(teacher_path, data_fingerprint, label_names, max_length, cfg)
    folder = (root or cache_root()) / "teachers" / key
    meta_file = folder / "fastkd-finetune.json"
    if meta_file.is_file():
        meta = json.loads(meta_file.read_text())
        log(f"teacher: reusing the fine-tuned teacher cached at {folder} (dev acc {meta.get('dev_acc', 'n/a')})")
        return folder
    log(f"teacher: {teacher_path} has no {len(label_names)}-label task head; fine-tuning it first "
        f"({cfg.epochs} epoch(s), {len(train_ds)} examples, lr {cfg.lr:g}); cached at {folder}")
    torch.manual_seed(cfg.seed)
    num_labels = len(label_names)
    model = AutoModelForSequenceClassification.from_pretrained(
        teacher_path, num_labels=num_labels, id2label=dict(enumerate(label_names)),
        label2id={n: i for i, n in enumerate(label_names)}, dtype=torch.float32, attn_implementation="sdpa")
    model.to(device).train()
    if cfg.freeze_word_embeddings:
        model.base_model.embeddings.word_embeddings.weight.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    fused = device.type == "cuda"
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused)
    sampler = LengthBucketSampler(train_ds["length"], cfg.batch_size, seed=cfg.seed, shuffle=True)
    total = max(1, cfg.epochs * len(sampler))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(total, int(cfg.warmup * total)))
    amp = torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else None
    t0, step = time.time(), 0
    for epoch in range(cfg.epochs):
        sampler.set_epoch(epoch)
        for batch in batches_for_epoch(sampler, train_ds, tokenizer.pad_token_id):
            batch = batch.to(device)
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                logits = model(**batch.model_inputs()).logits
            loss = F.cross_entropy(logits.float(), batch.labels)
            if not math.isfinite(float(loss.detach())):
                raise FloatingPointError(f"teacher fine-tuning: loss is {float(loss.detach())} at step {step}")
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            if step % 50 == 0:
                log(f"  fine-tune step {step}/{total} loss {float(loss.detach()):.4f} ({time.time() - t0:.0f}s)")
    model.eval()
    dev_acc = _accuracy(model, dev_ds, 64, device, tokenizer.pad_token_id) if dev_ds is not None else None
    log(f"teacher: fine-tuned in {time.time() - t0:.0f}s" + (f", dev acc {dev_acc:.4f}" if dev_acc is not None
                                                              else ""))
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.to("cpu").save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "fastkd-finetune.json").write_text(json.dumps(
        {"key": key, "teacher": str(teacher_path), "labels": list(label_names), "settings": asdict(cfg),
         "dev_acc": dev_acc, "examples": len(train_ds)}, indent=1))
    if folder.exists():  # another process finished first; keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        os.replace(tmp, folder)
    return folder
