"""Where a stage's teacher activations are kept: the choice between no cache, host memory, disk and GPU memory
(``--cache``), and the sizes and dtype that choice rests on."""

from __future__ import annotations

from pathlib import Path

import torch

from fastkd.cache.device import DeviceCache
from fastkd.cache.store import ActivationCache, TeacherCache
from fastkd.terms import reads_score_maps, seq_dim


def cache_dtype(teacher: torch.dtype) -> torch.dtype:
    """The cached activations' dtype: bf16 for a bf16 teacher (fp16 cannot hold its range), else fp16."""
    return torch.bfloat16 if teacher == torch.bfloat16 else torch.float16


def device_cache_budget(device: torch.device) -> int | None:
    """Bytes a device cache may take: half of what is free on the GPU, leaving the student's training room
    (over it, --cache device runs the teacher live and auto picks the host cache); None without a GPU."""
    return int(torch.cuda.mem_get_info(device)[0] * 0.5) if device.type == "cuda" else None


def cache_bytes(lengths, fields: list[str], hidden: int, labels: int, dtype: torch.dtype) -> int:
    """What a dataset's activations take in a device cache (token fields of ``hidden`` values per token, logits
    of ``labels`` values per example)."""
    token_fields = [f for f in fields if seq_dim(f) is not None]
    return DeviceCache.bytes_needed(lengths, len(token_fields) * hidden, (len(fields) - len(token_fields)) * labels,
                                    dtype)


def make_cache(mode: str, *, epochs: int, fields: list[str], lengths, device: torch.device, dtype: torch.dtype,
               ddp: bool, need_bytes, budget: int | None, disk_key, root: Path | None, rank: int, log,
               stage: str) -> ActivationCache | None:
    """The activation cache for one stage, or None (``--cache off``, nothing captured, or a one-epoch stage that
    a memory or device cache would never read). ``need_bytes()`` and ``disk_key()`` are computed only when
    needed (the key hashes the whole dataset)."""
    if mode == "off" or not fields:  # a stage that needs nothing from the teacher (e.g. a fine-tune)
        return None
    if reads_score_maps(fields):
        log(f"teacher cache: off for stage {stage}: it reads the teacher's real [B, H, L, L] attention scores "
            f"(DeBERTa/MPNet), which the cache does not hold; the teacher runs every step")
        return None
    host_or_device = mode in ("auto", "memory", "device")
    if host_or_device and ddp and epochs > 1:
        log("teacher cache: under DDP each rank sees other examples every epoch, so a memory or device "
            "cache hits about 1/world_size of the time; use --cache disk to share activations between ranks")
    if host_or_device and epochs < 2:
        what = "" if mode == "auto" else f"{mode} "
        log(f"teacher cache: stage {stage} runs one epoch, so a {what}cache would never be read; "
            f"not storing (use --cache disk to keep activations for later runs)")
        return None
    if mode == "auto":
        need = need_bytes()
        # Under DDP each rank meets other examples every epoch (hit rate ~1/world_size): a whole-dataset
        # buffer per GPU would mostly sit unread, so auto stays on the host there.
        mode = "device" if budget is not None and need <= budget and not ddp else "memory"
        log(f"teacher cache (auto): {mode} for stage {stage} ({need / 2**30:.2f} GiB of activations"
            + (f", GPU budget {budget / 2**30:.1f} GiB)" if budget is not None else "; no GPU)"))
    if mode == "device":
        return DeviceCache(lengths, device, dtype=dtype, budget_bytes=budget)
    return TeacherCache(mode, root, disk_key(), rank=rank)
