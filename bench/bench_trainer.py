"""Trainer throughput for TinyBERT task distillation (the intermediate stage: embedding + hidden + attention
losses, the heaviest stage): one full optimizer step (teacher activations, student forward, losses, backward,
clip, AdamW) per call, reported as samples/s with peak memory.

Cases: losses eager (``FASTKD_BACKEND=torch``) vs fused (Triton) × teacher fp32 live vs fp16 live vs cached
(teacher forward replaced by a host-cache read of its fp16 activations) vs device (the same from
``--cache device``). Teacher: the packaged MiniLM-L6-H384 with a
2-label head; student 3 × 384 (12 heads, FFN 1536), copied teacher layers. GPU: batch 32 × length 128, bf16
AMP. CPU: a few small cases (batch 8 × length 32, eager, fp32 live vs cached vs device); the rest skip with a
reason.
"""

from __future__ import annotations

import pytest
import torch

from bench.harness import HAS_CUDA

# The baseline a user has today is eager losses, a live fp32 teacher and an fp32 student (amp off); the other
# cases use the trainer's default AMP (bf16 on a GPU), so the table separates what AMP buys from what fastkd's
# fused losses, half-precision teacher and cache buy.
CASES = [("eager", "fp32", "off")] + [(backend, teacher, "auto") for backend in ("eager", "fused")
                                      for teacher in ("fp32", "fp16", "cached", "device")]


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from fastkd.models.teacher import default_teacher_path

    path = tmp_path_factory.mktemp("bench-teacher")
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(default_teacher_path(), num_labels=2,
                                                               dtype=torch.float32)
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(default_teacher_path()).save_pretrained(path)
    return path


def _data_file(folder, n: int, length: int):
    import random

    rng = random.Random(0)
    words = ["good", "bad", "movie", "film", "plot", "great", "awful", "really", "the", "a", "acting", "story"]
    lines = ["sentence\tlabel"] + [" ".join(rng.choice(words) for _ in range(length)) + f"\t{i % 2}"
                                   for i in range(n)]
    f = folder / "train.tsv"
    f.write_text("\n".join(lines) + "\n")
    return f


@pytest.mark.parametrize("backend,teacher,amp_flag", CASES)
def test_trainer_step_tinybert(measure, teacher_dir, tmp_path, monkeypatch, backend, teacher, amp_flag):
    if not HAS_CUDA and (backend == "fused" or teacher == "fp16"):
        pytest.skip("CPU: fused Triton losses and fp16 teachers are GPU cases (interpreter/half matmuls are no "
                    "timing on a CPU)")
    if not HAS_CUDA and amp_flag == "off":
        pytest.skip("CPU: AMP is off by default there, so this case is the eager fp32 live case")
    from fastkd import config
    from fastkd.training import engine, trainer
    from fastkd.training.batching import LengthBucketSampler

    monkeypatch.setenv("FASTKD_BACKEND", "torch" if backend == "eager" else "triton")
    batch, length = (32, 126) if HAS_CUDA else (8, 30)  # + [CLS], [SEP]
    data = _data_file(tmp_path, batch, length)
    argv = ["--method", "tinybert", "--teacher", str(teacher_dir), "--task", str(data), "--dev", str(data),
            "--test", str(data), "--output-dir", str(tmp_path / "out"), "--batch-size", str(batch),
            "--max-length", "128", "--epochs", "2", "--no-progress", "--teacher-dtype",
            "fp32" if teacher == "fp32" else "fp16",
            "--cache", {"cached": "memory", "device": "device"}.get(teacher, "off"),
            "--amp", amp_flag]
    cfg = config.parse_config(argv)
    tr = trainer.Trainer(cfg, log=lambda *_: None)
    tr.setup()
    stage = tr.recipe.stages[0]
    fields = tr.module.teacher_fields(stage)
    cache = tr.make_cache(stage, fields)
    tr.module.set_stage(stage, cache=cache)
    runner = tr.module.runner
    sampler = LengthBucketSampler(tr.data["task"]["length"], batch, shuffle=False)
    b = next(iter(engine.batches_for_epoch(sampler, tr.data["task"], tr.pad_id))).to(tr.device)
    runner(b)  # fills the cache when there is one
    assert teacher not in ("cached", "device") or cache.get(b.index, b.attention_mask.sum(1).cpu()) is not None
    amp = tr.amp
    opt = torch.optim.AdamW(tr.module.parameters(), lr=1e-5, fused=HAS_CUDA)

    def step():
        t_out = runner(b)
        with torch.autocast(tr.device.type, dtype=amp or torch.float32, enabled=amp is not None):
            loss = tr.module(b.input_ids, b.attention_mask, labels=b.labels, teacher_outputs=t_out).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(tr.module.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    calls_before = runner.calls
    rec = measure(step, "trainer_tinybert_intermediate_step",
                  {"backend": backend, "teacher": teacher, "batch": batch, "length": length + 2,
                   "amp": str(amp).replace("torch.", "") if amp else "off"}, rounds=None if HAS_CUDA else 3)
    if teacher in ("cached", "device"):
        assert runner.calls == calls_before  # the teacher forward never ran while timing
    if rec.get("median_ms"):
        rec["extra"]["samples_per_s"] = batch / (rec["median_ms"] * 1e-3)
        print(f"\n{backend:>5} teacher={teacher:<6}: {rec['extra']['samples_per_s']:.1f} samples/s, "
              f"peak mem {rec.get('peak_mem_mib')} MiB")
