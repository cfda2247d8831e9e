"""TeacherCache: round trips (memory and disk, fp16 and bf16), misses, stale keys, corrupt/truncated/missing files,
per-rank shards, stats, keys and fingerprints, and a real capture from a tiny BERT teacher."""

import json
import logging
from pathlib import Path

import pytest
import torch

from fastkd.cache.store import TeacherCache, default_root, prefer_scores
from fastkd.digest import fingerprint_dataset, fingerprint_model, fingerprint_tokenizer

H, D_HEAD, D_MODEL, C = 3, 4, 10, 5
SEQ_DIMS = {"q.0": 2, "hidden.1": 1, "logits": None, "scores.0": (2, 3)}
KEY = "a" * 64


def make_batch(gen, lengths, dtype=torch.float32, scale=3.0):
    """Random teacher outputs for a batch padded to max(lengths); q is a non-contiguous [B, H, L, d] view and the
    padded positions hold garbage (the cache must never return it)."""
    B, L = len(lengths), max(lengths)
    q = (torch.randn(B, L, H, D_HEAD, generator=gen) * scale).to(dtype).transpose(1, 2)
    hidden = (torch.randn(B, L, D_MODEL, generator=gen) * scale).to(dtype)
    logits = (torch.randn(B, C, generator=gen) * 20).to(dtype)  # large logits
    scores = (torch.randn(B, H, L, L, generator=gen) * scale).to(dtype)
    return {"q.0": q, "hidden.1": hidden, "logits": logits, "scores.0": scores}


def expected_example(tensors, row, length, dtype):
    """The unpadded values of one example after half-precision rounding."""
    return {"q.0": tensors["q.0"][row, :, :length].to(dtype),
            "hidden.1": tensors["hidden.1"][row, :length].to(dtype),
            "logits": tensors["logits"][row].to(dtype),
            "scores.0": tensors["scores.0"][row, :, :length, :length].to(dtype)}


def check_batch(out, truth, ids, lengths, dtype):
    """Compare a get() result with the stored examples: exact half-precision values, zero padding to max(lengths)."""
    width = max(lengths)
    assert out["q.0"].shape == (len(ids), H, width, D_HEAD)
    assert out["hidden.1"].shape == (len(ids), width, D_MODEL)
    assert out["logits"].shape == (len(ids), C)
    assert out["scores.0"].shape == (len(ids), H, width, width)
    for row, (i, n) in enumerate(zip(ids, lengths, strict=True)):
        exp = truth[i]
        assert all(t.dtype == dtype for t in out.values())
        assert torch.equal(out["q.0"][row, :, :n], exp["q.0"])
        assert torch.equal(out["hidden.1"][row, :n], exp["hidden.1"])
        assert torch.equal(out["logits"][row], exp["logits"])
        assert torch.equal(out["scores.0"][row, :, :n, :n], exp["scores.0"])
        assert not out["q.0"][row, :, n:].any() and not out["hidden.1"][row, n:].any()
        assert not out["scores.0"][row, :, n:].any() and not out["scores.0"][row, :, :, n:].any()


def fill(cache, gen, n=23, batch=6, dtype=torch.float16, seed_lengths=(1, 9)):
    """Put examples 0..n-1 (lengths 1..9, one example with a single token) in batches; return the truth."""
    lengths = torch.randint(seed_lengths[0], seed_lengths[1] + 1, (n,), generator=gen)
    lengths[3] = 1
    truth = {}
    perm = torch.randperm(n, generator=gen)
    for start in range(0, n, batch):
        ids = perm[start:start + batch]
        lens = lengths[ids]
        tensors = make_batch(gen, lens.tolist())
        for row, (i, k) in enumerate(zip(ids.tolist(), lens.tolist(), strict=True)):
            truth[i] = expected_example(tensors, row, k, dtype)
        assert cache.get(ids, lens) is None
        cache.put(ids, lens, tensors, SEQ_DIMS)
    return lengths, truth


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", ["memory", "disk"])
def test_round_trip_other_composition_and_order(tmp_path, gen, mode, dtype):
    cache = TeacherCache(mode, tmp_path, KEY, dtype=dtype)
    lengths, truth = fill(cache, gen, dtype=dtype)
    cache.flush()
    readers = [cache] + ([TeacherCache("disk", tmp_path, KEY, dtype=dtype)] if mode == "disk" else [])
    for reader in readers:  # the same run, and (disk) a later run that never saw the teacher
        for ids in ([22, 0, 5], [3], list(range(23))[::-1], [7, 3, 11, 19, 2, 8, 1]):
            idx = torch.tensor(ids)
            out = reader.get(idx, lengths[idx])
            assert out is not None
            check_batch(out, truth, ids, lengths[idx].tolist(), dtype)
    assert cache.stats["hits"] == 4 and cache.stats["misses"] == 4  # the four batches that ran the teacher
    assert readers[-1].stats["hits"] == 4 and readers[-1].stats["misses"] == (0 if mode == "disk" else 4)


def test_values_equal_fp16_rounding_of_fp32_and_bf16_inputs(tmp_path, gen):
    for source_dtype in (torch.float32, torch.bfloat16, torch.float16):
        cache = TeacherCache("disk", tmp_path / str(source_dtype), KEY)
        lens = [4, 1, 6]
        t = make_batch(gen, lens, dtype=source_dtype)
        cache.put(torch.tensor([0, 1, 2]), torch.tensor(lens), t, SEQ_DIMS)
        cache.flush()
        out = TeacherCache("disk", tmp_path / str(source_dtype), KEY).get(torch.tensor([2, 0, 1]),
                                                                           torch.tensor([6, 4, 1]))
        assert torch.equal(out["hidden.1"][0, :6], t["hidden.1"][2, :6].half())
        assert torch.equal(out["q.0"][1, :, :4], t["q.0"][0, :, :4].half())


def test_miss_for_unseen_index_is_all_or_nothing(tmp_path, gen):
    cache = TeacherCache("memory", None, KEY)
    lengths, _ = fill(cache, gen, n=10)
    before = cache.stats
    assert cache.get(torch.tensor([1, 2, 10]), torch.tensor([lengths[1], lengths[2], 4])) is None
    assert cache.get(torch.tensor([99]), torch.tensor([3])) is None
    assert cache.get(torch.tensor([1, 2]), lengths[[1, 2]]) is not None
    s = cache.stats
    assert s["misses"] == before["misses"] + 2 and s["hits"] == before["hits"] + 1
    assert 10 in [k for k in range(11) if k not in cache] and 1 in cache and len(cache) == 10


def test_put_skips_stored_examples_after_a_partial_miss(tmp_path, gen):
    cache = TeacherCache("memory", None, KEY)
    first = make_batch(gen, [3, 2])
    cache.put(torch.tensor([0, 1]), torch.tensor([3, 2]), first, SEQ_DIMS)
    second = make_batch(gen, [2, 5])  # example 1 again (a different tensor: must not replace the stored one)
    cache.put(torch.tensor([1, 2]), torch.tensor([2, 5]), second, SEQ_DIMS)
    out = cache.get(torch.tensor([1, 2]), torch.tensor([2, 5]))
    assert torch.equal(out["hidden.1"][0, :2], first["hidden.1"][1, :2].half())
    assert torch.equal(out["hidden.1"][1, :5], second["hidden.1"][1, :5].half())


def test_stats_hit_rate_and_bytes(tmp_path, gen):
    cache = TeacherCache("disk", tmp_path, KEY)
    lengths, _ = fill(cache, gen, n=12, batch=4)  # 3 misses
    for _ in range(3):
        assert cache.get(torch.tensor([0, 1, 2]), lengths[:3]) is not None
    s = cache.stats
    assert (s["hits"], s["misses"], s["hit_rate"], s["examples"]) == (3, 3, 0.5, 12)
    per_example = [H * D_HEAD * n + D_MODEL * n + C + H * n * n for n in lengths.tolist()]
    assert s["bytes"] == 2 * sum(per_example)  # unpadded, two bytes a value
    cache.flush()
    files = sum(p.stat().st_size for p in (tmp_path / KEY).glob("*.safetensors"))
    assert cache.stats["bytes"] == files and files > 2 * sum(per_example)  # plus the header and index


def test_off_mode_never_stores(tmp_path, gen):
    cache = TeacherCache("off", None, "")
    t = make_batch(gen, [2, 3])
    cache.put(torch.tensor([0, 1]), torch.tensor([2, 3]), t, SEQ_DIMS)
    assert cache.get(torch.tensor([0, 1]), torch.tensor([2, 3])) is None
    assert cache.stats["misses"] == 1 and cache.stats["hits"] == 0 and cache.stats["bytes"] == 0


# ---------------------------------------------------------------------------------------------------------------
# stale and corrupt caches
# ---------------------------------------------------------------------------------------------------------------

def written_cache(tmp_path, gen, key=KEY, **kw):
    cache = TeacherCache("disk", tmp_path, key, **kw)
    lengths, truth = fill(cache, gen, n=12, batch=4)
    cache.flush()
    return lengths, truth


def test_other_key_misses_and_builds_its_own(tmp_path, gen):
    lengths, _ = written_cache(tmp_path, gen)
    other = TeacherCache("disk", tmp_path, "b" * 64)
    assert other.get(torch.tensor([0]), lengths[:1]) is None and len(other) == 0


def test_stale_manifest_key_is_rebuilt_with_warning(tmp_path, gen, caplog):
    lengths, _ = written_cache(tmp_path, gen)
    manifest = tmp_path / KEY / "manifest-rank0.json"
    m = json.loads(manifest.read_text())
    m["key"] = "c" * 64
    manifest.write_text(json.dumps(m))
    with caplog.at_level(logging.WARNING, logger="fastkd.cache.store"):
        cache = TeacherCache("disk", tmp_path, KEY)
    assert "stale" in caplog.text and "rebuilding" in caplog.text
    assert cache.get(torch.tensor([0]), lengths[:1]) is None and len(cache) == 0
    assert not list((tmp_path / KEY).glob("*"))  # the stale files are gone
    _, truth = fill(cache, gen, n=5)  # rebuilt by the next epoch's puts
    cache.flush()
    assert len(TeacherCache("disk", tmp_path, KEY)) == 5


def test_dtype_change_is_stale(tmp_path, gen, caplog):
    written_cache(tmp_path, gen)
    with caplog.at_level(logging.WARNING, logger="fastkd.cache.store"):
        cache = TeacherCache("disk", tmp_path, KEY, dtype=torch.bfloat16)
    assert "bfloat16" in caplog.text and len(cache) == 0


@pytest.mark.parametrize("where", ["data", "header", "index"])
def test_altered_shard_bytes_detected_and_rebuilt(tmp_path, gen, caplog, where):
    lengths, truth = written_cache(tmp_path, gen)
    shard = next((tmp_path / KEY).glob("*.safetensors"))
    raw = bytearray(shard.read_bytes())
    header_len = int.from_bytes(raw[:8], "little")
    pos = {"data": len(raw) - 3, "header": 20, "index": 8 + header_len + 2}[where]
    raw[pos] ^= 0x40  # same size: only the checksum can tell
    shard.write_bytes(bytes(raw))
    with caplog.at_level(logging.WARNING, logger="fastkd.cache.store"):
        cache = TeacherCache("disk", tmp_path, KEY)
    assert "checksum" in caplog.text
    assert cache.get(torch.tensor([0]), lengths[:1]) is None and len(cache) == 0
    fill(cache, gen, n=12, batch=4)
    cache.flush()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fastkd.cache.store"):
        again = TeacherCache("disk", tmp_path, KEY)
    assert not caplog.text and len(again) == 12


def test_truncated_shard_detected(tmp_path, gen, caplog):
    lengths, _ = written_cache(tmp_path, gen)
    shard = next((tmp_path / KEY).glob("*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:-7])
    with caplog.at_level(logging.WARNING, logger="fastkd.cache.store"):
        cache = TeacherCache("disk", tmp_path, KEY)
    assert "truncated" in caplog.text and len(cache) == 0


def test_truncated_shard_detected_even_if_manifest_agrees(tmp_path, gen, caplog):
    """Size and checksum rewritten to match a truncated file: the offsets check still refuses it."""
    written_cache(tmp_path, gen)
    shard = next((tmp_path / KEY).glob("*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:-8])
    manifest = tmp_path / KEY / "manifest-rank0.json"
    m = json.loads(manifest.read_text())
    from fastkd.digest import sha256_file

    m["shards"][0].update(bytes=shard.stat().st_size, sha256=sha256_file(shard))
    manifest.write_text(json.dumps(m))
    with caplog.at_level(logging.WARNING, logger="fastkd.cache.store"):
        cache = TeacherCache("disk", tmp_path, KEY)
    assert "outside the file" in caplog.text and len(cache) == 0


def test_missing_shard_and_missing_manifest(tmp_path, gen, caplog):
    written_cache(tmp_path, gen)
    next((tmp_path / KEY).glob("*.safetensors")).unlink()
    with caplog.at_level(logging.WARNING, logger="fastkd.cache.store"):
        assert len(TeacherCache("disk", tmp_path, KEY)) == 0
    assert "missing" in caplog.text
    caplog.clear()
    written_cache(tmp_path, gen)
    (tmp_path / KEY / "manifest-rank0.json").unlink()  # shards without a manifest: an interrupted write
    with caplog.at_level(logging.WARNING, logger="fastkd.cache.store"):
        assert len(TeacherCache("disk", tmp_path, KEY)) == 0
    assert "no manifest" in caplog.text and not list((tmp_path / KEY).glob("*.safetensors"))


def test_length_mismatch_is_a_warned_miss(tmp_path, gen, caplog):
    cache = TeacherCache("memory", None, KEY)
    lengths, _ = fill(cache, gen, n=4)
    with caplog.at_level(logging.WARNING, logger="fastkd.cache.store"):
        assert cache.get(torch.tensor([0]), lengths[:1] + 1) is None
    assert "tokenisation changed" in caplog.text


# ---------------------------------------------------------------------------------------------------------------
# shards, ranks, file format
# ---------------------------------------------------------------------------------------------------------------

def test_small_shards_and_safetensors_format(tmp_path, gen):
    from safetensors import safe_open

    cache = TeacherCache("disk", tmp_path, KEY, shard_bytes=600)  # a shard every few examples
    lengths, truth = fill(cache, gen, n=20, batch=4)
    cache.flush()
    shards = sorted((tmp_path / KEY).glob("rank0-shard*.safetensors"))
    assert len(shards) > 2
    reader = TeacherCache("disk", tmp_path, KEY)
    idx = torch.arange(20)
    check_batch(reader.get(idx, lengths), truth, idx.tolist(), lengths.tolist(), torch.float16)
    with safe_open(str(shards[0]), framework="pt") as f:
        assert {"__index__", "__lengths__", "q.0", "hidden.1", "logits", "scores.0"} <= set(f.keys())
        first = int(f.get_tensor("__index__")[0])
        n = int(f.get_tensor("__lengths__")[0])
        assert torch.equal(f.get_tensor("q.0")[: H * n * D_HEAD].view(H, n, D_HEAD), truth[first]["q.0"])


def test_per_rank_shards_read_by_every_rank(tmp_path, gen):
    rank0 = TeacherCache("disk", tmp_path, KEY, rank=0)
    rank1 = TeacherCache("disk", tmp_path, KEY, rank=1)
    t0, t1 = make_batch(gen, [3, 4]), make_batch(gen, [5, 2])
    rank0.put(torch.tensor([0, 1]), torch.tensor([3, 4]), t0, SEQ_DIMS)
    rank1.put(torch.tensor([2, 3]), torch.tensor([5, 2]), t1, SEQ_DIMS)
    rank0.flush()
    rank1.flush()
    names = sorted(p.name for p in (tmp_path / KEY).iterdir())
    assert names == ["manifest-rank0.json", "manifest-rank1.json", "rank0-shard00000.safetensors",
                     "rank1-shard00000.safetensors"]
    assert rank0.get(torch.tensor([2]), torch.tensor([5])) is None  # not yet read
    rank0.refresh()  # after a barrier
    out = rank0.get(torch.tensor([2, 0]), torch.tensor([5, 3]))
    assert torch.equal(out["hidden.1"][0], t1["hidden.1"][0].half())
    rank0.refresh()
    assert rank0.stats["examples"] == 4  # refreshing twice does not double count
    later = TeacherCache("disk", tmp_path, KEY, rank=1)  # a later run sees both ranks
    assert len(later) == 4


# ---------------------------------------------------------------------------------------------------------------
# bad input, non-finite values
# ---------------------------------------------------------------------------------------------------------------

def test_non_finite_values_are_refused(gen):
    cache = TeacherCache("memory", None, KEY)
    t = make_batch(gen, [2, 3])
    t["hidden.1"][1, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"hidden\.1.*NaN"):
        cache.put(torch.tensor([0, 1]), torch.tensor([2, 3]), t, SEQ_DIMS)
    t = make_batch(gen, [2, 3])
    t["logits"][0, 0] = 1e6  # finite in fp32, inf in fp16
    with pytest.raises(ValueError, match="bfloat16"):
        cache.put(torch.tensor([0, 1]), torch.tensor([2, 3]), t, SEQ_DIMS)
    assert len(cache) == 0
    bf = TeacherCache("memory", None, KEY, dtype=torch.bfloat16)
    bf.put(torch.tensor([0, 1]), torch.tensor([2, 3]), t, SEQ_DIMS)
    assert bf.get(torch.tensor([0]), torch.tensor([2]))["logits"][0, 0] == torch.tensor(1e6).bfloat16()


def test_bad_arguments(tmp_path, gen):
    with pytest.raises(ValueError, match="mode"):
        TeacherCache("gpu", None, KEY)
    with pytest.raises(ValueError, match="key"):
        TeacherCache("disk", tmp_path, "../escape")
    with pytest.raises(ValueError, match="dtype"):
        TeacherCache("memory", None, KEY, dtype=torch.float32)
    cache = TeacherCache("memory", None, KEY)
    t = make_batch(gen, [2, 3])
    idx, lens = torch.tensor([0, 1]), torch.tensor([2, 3])
    with pytest.raises(ValueError, match="seq_dims"):
        cache.put(idx, lens, t, {"q.0": 2})
    with pytest.raises(ValueError, match=r"seq_dims\['q.0'\]"):
        cache.put(idx, lens, t, {**SEQ_DIMS, "q.0": 4})
    with pytest.raises(ValueError, match="batch dim"):
        cache.put(torch.tensor([0, 1, 2]), torch.tensor([2, 3, 1]), t, SEQ_DIMS)
    with pytest.raises(ValueError, match="shorter"):
        cache.put(idx, torch.tensor([2, 9]), t, SEQ_DIMS)
    with pytest.raises(ValueError, match="lengths"):
        cache.get(idx, torch.tensor([2]))
    with pytest.raises(ValueError, match="lengths"):
        cache.get(idx, torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="index"):
        cache.get(torch.tensor([0.0]), torch.tensor([1]))
    with pytest.raises(ValueError, match="tensors"):
        cache.put(idx, lens, {"__index__": t["logits"]}, {"__index__": None})
    cache.put(idx, lens, t, SEQ_DIMS)
    with pytest.raises(ValueError, match="different recipe"):
        cache.put(torch.tensor([5]), torch.tensor([1]), {"logits": torch.randn(1, C)}, {"logits": None})


# ---------------------------------------------------------------------------------------------------------------
# keys and fingerprints
# ---------------------------------------------------------------------------------------------------------------

def test_make_key_order_independent_and_sensitive():
    base = dict(teacher="t1", data="d1", tokenizer="tok", max_length=128, dtype=torch.float16,
                recipe={"hidden": [1, 3], "qkv": "qk"})
    k = TeacherCache.make_key(**base)
    assert len(k) == 64 and k == TeacherCache.make_key(**dict(reversed(list(base.items()))))
    for name, value in [("teacher", "t2"), ("data", "d2"), ("tokenizer", "tok2"), ("max_length", 64),
                        ("dtype", torch.bfloat16), ("recipe", {"hidden": [1, 4], "qkv": "qk"})]:
        assert TeacherCache.make_key(**{**base, name: value}) != k, name
    with pytest.raises(ValueError, match="teacher"):
        TeacherCache.make_key(teacher=object())
    with pytest.raises(ValueError, match="parts"):
        TeacherCache.make_key()


def test_fingerprints_follow_weights_tokens_and_vocab():
    import datasets
    from transformers import AutoTokenizer, BertModel

    from fastkd.models.teacher import default_teacher_path
    from tests.helpers import tiny_bert_config

    torch.manual_seed(0)
    model = BertModel(tiny_bert_config())
    fp = fingerprint_model(model)
    assert fp == fingerprint_model(model)
    with torch.no_grad():
        model.encoder.layer[2].output.dense.weight[0, 0] += 1e-3
    assert fingerprint_model(model) != fp
    ds = datasets.Dataset.from_dict({"input_ids": [[101, 5, 102], [101, 102]]})
    fd = fingerprint_dataset(ds)
    assert fd == fingerprint_dataset(datasets.Dataset.from_dict({"input_ids": [[101, 5, 102], [101, 102]]}))
    assert fd != fingerprint_dataset(datasets.Dataset.from_dict({"input_ids": [[101, 5], [102, 101, 102]]}))
    assert fd != fingerprint_dataset(ds.select([1, 0]))  # order matters: row numbers are the cache keys
    pairs = ds.add_column("type_start", [2, 2])  # same ids as a sentence pair: other segment ids, other data
    assert fingerprint_dataset(pairs) not in (fd, fingerprint_dataset(ds.add_column("type_start", [2, 1])))
    tok = AutoTokenizer.from_pretrained(default_teacher_path())
    assert fingerprint_tokenizer(tok) == fingerprint_tokenizer(AutoTokenizer.from_pretrained(default_teacher_path()))


def test_default_root_from_env(monkeypatch, tmp_path):
    monkeypatch.setenv("FASTKD_CACHE_DIR", str(tmp_path / "c"))
    assert default_root() == tmp_path / "c" / "activations"
    monkeypatch.delenv("FASTKD_CACHE_DIR")
    # one cache for every working directory, beside the fine-tuned teachers
    assert default_root() == Path.home() / ".cache" / "fastkd" / "activations"


def test_prefer_scores_trade_off():
    assert prefer_scores(13, 32) and prefer_scores(63, 32)  # SST-2-like lengths: the score map is smaller
    assert not prefer_scores(64, 32) and not prefer_scores(512, 64)


# ---------------------------------------------------------------------------------------------------------------
# a real teacher: tiny BERT activations through ActivationCapture, batches recomposed
# ---------------------------------------------------------------------------------------------------------------

def test_cached_capture_matches_teacher_in_another_batch(tmp_path, gen):
    from transformers import BertModel

    from fastkd.models.capture import capture
    from fastkd.training.batching import collate
    from tests.helpers import tiny_bert_config

    torch.manual_seed(1)
    teacher = BertModel(tiny_bert_config()).eval()
    feats = [{"input_ids": [2] + torch.randint(5, 120, (n - 2,), generator=gen).tolist() + [3], "index": i}
             for i, n in enumerate([9, 2, 5, 13, 7, 3])]
    cache = TeacherCache("disk", tmp_path, KEY)
    seq_dims = {"emb": 1, "hidden.3": 1, "q.1": 2, "k.1": 2}

    def teacher_tensors(batch):
        with torch.no_grad():
            _, cap = capture(teacher, {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask},
                             [1, 3], hidden=[3], qkv={1: "qk"}, embeddings=True)
        return {"emb": cap.embeddings, "hidden.3": cap.hidden[3], "q.1": cap.q[1], "k.1": cap.k[1]}

    for group in ([0, 1, 2], [3, 4, 5]):
        b = collate([feats[i] for i in group], pad_token_id=0)
        cache.put(b.index, b.lengths, teacher_tensors(b), seq_dims)
    cache.flush()
    b = collate([feats[i] for i in (5, 1, 3)], pad_token_id=0)  # another composition, another padded width
    got = TeacherCache("disk", tmp_path, KEY).get(b.index, b.lengths)
    ref = teacher_tensors(b)
    mask = b.attention_mask.bool()
    for name, dim in seq_dims.items():
        assert got[name].shape == ref[name].shape
        if dim == 1:
            valid_got, valid_ref = got[name][mask].float(), ref[name][mask]
        else:
            valid_got, valid_ref = got[name].transpose(1, 2)[mask].float(), ref[name].transpose(1, 2)[mask]
        err = float((valid_got - valid_ref).norm() / valid_ref.norm())
        assert err < 1e-3, (name, err)  # fp16 storage; the teacher's padded tokens never leak in
