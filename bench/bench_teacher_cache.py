"""Does the teacher cache pay? What one batch of teacher activations costs: a live forward of the teacher (with the
capture hooks) vs a read of the same tensors from the cache: host memory or disk shards (assembled on the CPU and
moved to the device) or the device cache (``--cache device``: one gather per field on the device).

The fields are what TinyBERT's intermediate stage takes from the 6-layer MiniLM teacher (embeddings, hidden states
and Q/K of three layers: 10 tensors). GPU: fp16 teacher, batch 32 × length 128 (lengths uniform in [64, 128]).
CPU: fp32 teacher, batch 8 × length 32. A host-cache read assembles the padded batch on the CPU (per example, per
field) and copies it to the device, so for a small teacher on a fast GPU it can cost more than the forward it
replaces; these cases say which, on the machine they run on. ``bytes_moved`` is the size of the fields (fp16).
"""

from __future__ import annotations

import pytest
import torch

from bench.harness import HAS_CUDA

FIELDS = ["emb"] + [f"{c}.{i}" for i in (1, 3, 5) for c in ("hidden", "q", "k")]
B, L = (32, 128) if HAS_CUDA else (8, 32)


@pytest.fixture(scope="module")
def teacher_batch():
    from transformers import AutoModel

    from fastkd.models.teacher import default_teacher_path
    from fastkd.training.batching import collate

    device = "cuda" if HAS_CUDA else "cpu"
    dtype = torch.float16 if HAS_CUDA else torch.float32
    model = AutoModel.from_pretrained(default_teacher_path(), dtype=dtype, attn_implementation="sdpa")
    model.to(device).eval().requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(L // 2, L + 1, (B,), generator=g).tolist()
    lengths[0] = L
    feats = [{"index": i, "input_ids": [101] + torch.randint(1000, 29000, (n - 2,), generator=g).tolist() + [102]}
             for i, n in enumerate(lengths)]
    host = collate(feats, pad_token_id=0)
    return model, host, host.to(device)


@pytest.mark.parametrize("source", ["live", "memory", "disk", "device"])
def test_teacher_activations(measure, teacher_batch, tmp_path, source):
    from fastkd.cache.device import DeviceCache
    from fastkd.cache.store import TeacherCache
    from fastkd.train import TeacherRunner

    model, host, batch = teacher_batch
    device = batch.input_ids.device
    if source == "device":
        cache = DeviceCache(host.lengths.tolist(), device)
    else:
        cache = None if source == "live" else TeacherCache(source, tmp_path, "bench" + "0" * 19)
    runner = TeacherRunner(model, FIELDS, cache, device)
    out = runner(batch, host)  # fills the cache when there is one
    assert sorted(out) == sorted(FIELDS)
    if cache is not None:
        cache.flush()
        if source == "disk":  # a later run: reads the memory-mapped shards from disk
            cache = TeacherCache("disk", tmp_path, "bench" + "0" * 19)
            runner = TeacherRunner(model, FIELDS, cache, device)
        assert cache.get(host.index, host.lengths) is not None
    calls = runner.calls
    nbytes = sum(t.numel() for t in out.values()) * 2  # the fields in fp16, as the cache stores them

    def step():
        runner(batch, host)

    measure(step, "teacher_activations", {"source": source, "B": B, "L": L, "fields": len(FIELDS),
                                          "teacher": "fp16" if HAS_CUDA else "fp32", "device": device.type},
            bytes_moved=nbytes, rounds=None if HAS_CUDA else 5)
    if source != "live":
        assert runner.calls == calls  # every timed call was a cache hit
