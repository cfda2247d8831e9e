"""fastkd.cache.device.DeviceCache: the same batches as the host cache (TeacherCache, memory mode), gathered from
flat token-major buffers; misses, partial batches, budget fallback and bad input."""

from __future__ import annotations

import pytest
import torch

from fastkd.cache.device import DeviceCache
from fastkd.cache.store import TeacherCache
from fastkd.terms import seq_dim

N, H, D, C = 12, 3, 8, 4


def _dataset(gen):
    return torch.randint(1, 9, (N,), generator=gen).tolist()


def _batch(ids, lengths, gen):
    lens = torch.tensor([lengths[i] for i in ids])
    W = int(lens.max())
    B = len(ids)
    t = {"emb": torch.randn(B, W, D, generator=gen), "hidden.2": torch.randn(B, W, D, generator=gen),
         "q.2": torch.randn(B, H, W, 5, generator=gen), "logits": torch.randn(B, C, generator=gen) * 50}
    # What the teacher writes at padding positions is arbitrary: make it loud, the cache must not keep it.
    pad = torch.arange(W)[None] >= lens[:, None]
    for name in ("emb", "hidden.2"):
        t[name][pad] = 1e4
    t["q.2"].masked_fill_(pad[:, None, :, None], 1e4)
    return torch.tensor(ids), lens, {k: v.half() for k, v in t.items()}


def test_matches_the_host_cache_batch_for_batch(gen, tmp_path):
    lengths = _dataset(gen)
    dev = DeviceCache(lengths, "cpu")
    host = TeacherCache("memory", tmp_path, "k" * 24)
    for ids in ([0, 3, 5], [1, 2, 4, 6], [7, 8, 9, 10, 11]):
        index, lens, tensors = _batch(ids, lengths, gen)
        dims = {k: seq_dim(k) for k in tensors}
        dev.put(index, lens, tensors, dims)
        host.put(index, lens, tensors, dims)
    for ids in ([11, 0, 6], [5], [2, 3, 4, 9, 10, 1, 7, 8]):  # regrouped, as the next epoch's batches are
        index = torch.tensor(ids)
        lens = torch.tensor([lengths[i] for i in ids])
        a, b = dev.get(index, lens), host.get(index, lens)
        assert a.keys() == b.keys()
        for k in a:
            assert a[k].dtype == torch.float16 and a[k].shape == b[k].shape, k
            assert torch.equal(a[k], b[k]), k  # padding zero in both
    assert dev.stats["hit_rate"] == 1.0 and len(dev) == N


def test_miss_until_every_example_is_stored(gen):
    lengths = _dataset(gen)
    dev = DeviceCache(lengths, "cpu")
    index, lens, tensors = _batch([0, 1], lengths, gen)
    assert dev.get(index, lens) is None  # nothing yet
    dev.put(index, lens, tensors, {k: seq_dim(k) for k in tensors})
    assert dev.get(torch.tensor([0, 2]), torch.tensor([lengths[0], lengths[2]])) is None
    assert dev.get(torch.tensor([1, 0]), torch.tensor([lengths[1], lengths[0]])) is not None
    wrong = torch.tensor([lengths[1] + 1, lengths[0]])
    assert dev.get(torch.tensor([1, 0]), wrong) is None  # a different tokenisation is a miss, never a wrong read
    assert dev.stats["misses"] == 3 and dev.stats["hits"] == 1


def test_over_budget_stores_nothing_and_says_why(gen):
    lengths = _dataset(gen)
    dev = DeviceCache(lengths, "cpu", budget_bytes=100)
    index, lens, tensors = _batch([0, 1], lengths, gen)
    dev.put(index, lens, tensors, {k: seq_dim(k) for k in tensors})
    assert dev.get(index, lens) is None and dev.stats["bytes"] == 0
    assert "over the device budget" in dev.stats["note"]


def test_bad_input(gen):
    lengths = _dataset(gen)
    dev = DeviceCache(lengths, "cpu")
    index, lens, tensors = _batch([0, 1], lengths, gen)
    dims = {k: seq_dim(k) for k in tensors}
    with pytest.raises(ValueError, match="lengths: they differ"):
        dev.put(index, lens + 1, tensors, dims)
    with pytest.raises(ValueError, match=r"index: expected example ids in \[0, 12\)"):
        dev.put(torch.tensor([0, 12]), lens, tensors, dims)
    bad = dict(tensors, emb=tensors["emb"].clone())
    bad["emb"][0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"tensors\['emb'\]: non-finite"):
        dev.put(index, lens, bad, dims)
    assert len(dev) == 0 and dev.get(index, lens) is None  # nothing of that batch was kept
    with pytest.raises(ValueError, match="one sequence dim per field"):
        DeviceCache(lengths, "cpu").put(index, lens, {"scores": torch.randn(2, 9, 9)}, {"scores": (1, 2)})
    with pytest.raises(ValueError, match="lengths: expected one positive"):
        DeviceCache([3, 0], "cpu")


def test_bytes_needed_is_what_the_buffers_take(gen):
    lengths = _dataset(gen)
    dev = DeviceCache(lengths, "cpu")
    index, lens, tensors = _batch([0, 1, 2], lengths, gen)
    dev.put(index, lens, tensors, {k: seq_dim(k) for k in tensors})
    assert dev.stats["bytes"] == DeviceCache.bytes_needed(lengths, token_elems=D + D + H * 5, example_elems=C)
