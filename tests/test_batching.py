"""collate and LengthBucketSampler: padding, determinism, bucketing (measured on SST-2), resume, DDP sharding."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fastkd.training.batching import Batch, LengthBucketSampler, collate, make_loader, padding_waste


def _lengths(n, seed=0, low=1, high=60):
    return np.random.default_rng(seed).integers(low, high, size=n)


# ---------------------------------------------------------------------------------------------------------------
# collate
# ---------------------------------------------------------------------------------------------------------------

def test_collate_pads_to_batch_max_with_mask_labels_index():
    feats = [{"input_ids": [101, 7, 8, 102], "index": 12, "label": 1},
             {"input_ids": [101, 102], "index": 3, "label": 0},
             {"input_ids": [101, 5, 102], "index": 40, "label": 1}]
    b = collate(feats, pad_token_id=9)
    assert b.input_ids.tolist() == [[101, 7, 8, 102], [101, 102, 9, 9], [101, 5, 102, 9]]
    assert b.attention_mask.tolist() == [[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]]
    assert b.labels.tolist() == [1, 0, 1] and b.index.tolist() == [12, 3, 40]
    assert b.lengths.tolist() == [4, 2, 3]
    assert b.input_ids.dtype == b.attention_mask.dtype == b.index.dtype == b.labels.dtype == torch.long


def test_collate_unlabelled_and_one_token():
    b = collate([{"input_ids": [5], "index": 0}], pad_token_id=0)
    assert b.labels is None and b.input_ids.shape == (1, 1) and b.attention_mask.tolist() == [[1]]
    moved = b.to("cpu")
    assert isinstance(moved, Batch) and moved.labels is None and torch.equal(moved.input_ids, b.input_ids)


def test_collate_rejects_bad_input():
    with pytest.raises(ValueError, match="features"):
        collate([], pad_token_id=0)
    with pytest.raises(ValueError, match="index"):
        collate([{"input_ids": [1, 2]}], pad_token_id=0)
    with pytest.raises(ValueError, match="no tokens"):
        collate([{"input_ids": [], "index": 0}], pad_token_id=0)


# ---------------------------------------------------------------------------------------------------------------
# sampler: determinism, coverage, bucketing
# ---------------------------------------------------------------------------------------------------------------

def test_deterministic_per_seed_and_epoch():
    lengths = _lengths(1000)
    a, b = LengthBucketSampler(lengths, 16, seed=5), LengthBucketSampler(lengths, 16, seed=5)
    a.set_epoch(3)
    b.set_epoch(3)
    assert list(a) == list(b)
    assert list(a) == list(a)  # iterating again repeats the epoch
    b.set_epoch(4)
    assert list(a) != list(b)
    c = LengthBucketSampler(lengths, 16, seed=6)
    c.set_epoch(3)
    assert list(a) != list(c)


def test_epoch_covers_every_example_once():
    lengths = _lengths(1001)
    s = LengthBucketSampler(lengths, 32, seed=1)
    batches = list(s)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(1001)) and len(batches) == len(s) == 32
    assert all(31 <= len(b) <= 32 for b in batches)  # the remainder is spread, no tiny last batch


def test_drop_last_gives_full_batches():
    s = LengthBucketSampler(_lengths(1001), 32, seed=1, drop_last=True)
    batches = list(s)
    assert len(batches) == len(s) == 31 and all(len(b) == 32 for b in batches)
    assert len({i for b in batches for i in b}) == 31 * 32


def test_no_shuffle_is_length_sorted():
    lengths = _lengths(300)
    batches = list(LengthBucketSampler(lengths, 10, shuffle=False))
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(300))
    assert np.all(np.diff(lengths[flat]) >= 0)


def test_batches_have_similar_lengths_and_order_is_shuffled():
    lengths = _lengths(4000, seed=2)
    batches = list(LengthBucketSampler(lengths, 32, seed=0, bucket_batches=20))
    spread = np.mean([np.ptp(lengths[b]) for b in batches])
    random_spread = np.mean([np.ptp(lengths[b]) for b in np.array_split(np.random.default_rng(0).permutation(4000),
                                                                         len(batches))])
    # ~11 examples per length in a 640-example bucket: a batch of 32 spans about 3 lengths, random ones about 55
    assert spread < 5 and random_spread > 40
    maxima = [lengths[b].max() for b in batches]
    assert not (np.all(np.diff(maxima) >= 0) or np.all(np.diff(maxima) <= 0))  # batch order is not sorted


@pytest.fixture(scope="module")
def sst2_lengths():
    from transformers import AutoTokenizer

    from fastkd.data import load_texts, tokenize
    from fastkd.models.teacher import default_teacher_path

    tok = AutoTokenizer.from_pretrained(default_teacher_path())
    return np.asarray(tokenize(load_texts("sst2", "train"), tok, max_length=128)["length"])


def test_bucketing_cuts_padding_on_sst2(sst2_lengths):
    """SST-2 train with the packaged teacher's tokenizer: padding waste of random batches vs bucketed batches."""
    lengths = sst2_lengths
    assert len(lengths) == 60614
    rng = np.random.default_rng(0)
    random_batches = np.array_split(rng.permutation(len(lengths)), -(-len(lengths) // 32))
    random_waste = padding_waste(lengths, random_batches)
    bucketed = LengthBucketSampler(lengths, 32, seed=0)
    bucketed_waste = padding_waste(lengths, list(bucketed))
    sorted_waste = padding_waste(lengths, list(LengthBucketSampler(lengths, 32, shuffle=False)))
    print(f"\nSST-2 train padding waste, batch 32: random {random_waste:.1%}, bucketed {bucketed_waste:.1%}, "
          f"fully sorted {sorted_waste:.1%}")
    assert random_waste > 0.4  # SST-2 mixes 3-token phrases with 60-token sentences
    assert bucketed_waste < random_waste / 10
    assert sorted_waste <= bucketed_waste


def test_padding_waste_definition():
    assert padding_waste([2, 4, 4, 1], [[0, 1], [2, 3]]) == pytest.approx(1 - 11 / 16)
    assert padding_waste([3, 3], [[0, 1]]) == 0.0


# ---------------------------------------------------------------------------------------------------------------
# resume
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("world_size", [1, 3])
def test_resume_mid_epoch_is_exact(world_size):
    lengths = _lengths(2000, seed=4)
    rank = world_size - 1
    uninterrupted = LengthBucketSampler(lengths, 16, seed=9, rank=rank, world_size=world_size)
    uninterrupted.set_epoch(2)
    expected = list(uninterrupted)

    run = LengthBucketSampler(lengths, 16, seed=9, rank=rank, world_size=world_size)
    run.set_epoch(2)
    it = iter(run)
    seen = [next(it) for _ in range(7)]
    state = run.state_dict()
    assert state["epoch"] == 2 and state["batches_done"] == 7

    resumed = LengthBucketSampler(lengths, 16, seed=9, rank=rank, world_size=world_size)
    resumed.load_state_dict(state)
    resumed.set_epoch(2)  # a trainer calling set_epoch for the resumed epoch keeps the resume point
    rest = list(resumed)
    assert seen + rest == expected
    resumed.set_epoch(3)  # the next epoch starts from its beginning
    nxt = LengthBucketSampler(lengths, 16, seed=9, rank=rank, world_size=world_size)
    nxt.set_epoch(3)
    assert list(resumed) == list(nxt)


def test_resume_through_a_dataloader_with_consumed_count():
    import datasets

    n = 300
    lengths = _lengths(n, seed=8, high=12)
    ds = datasets.Dataset.from_dict({"input_ids": [[7] * int(k) for k in lengths], "index": list(range(n)),
                                     "label": [i % 2 for i in range(n)]})
    sampler = LengthBucketSampler(lengths, 8, seed=1)
    full = [b.index.tolist() for b in make_loader(ds, sampler, pad_token_id=0)]
    sampler2 = LengthBucketSampler(lengths, 8, seed=1)
    loader = make_loader(ds, sampler2, pad_token_id=0)
    consumed = []
    for step, batch in enumerate(loader):
        consumed.append(batch.index.tolist())
        assert batch.input_ids.shape[1] == int(lengths[batch.index].max())
        if step == 10:
            break
    state = sampler2.state_dict(batches_consumed=len(consumed))
    sampler3 = LengthBucketSampler(lengths, 8, seed=1)
    sampler3.load_state_dict(state)
    rest = [b.index.tolist() for b in make_loader(ds, sampler3, pad_token_id=0)]
    assert consumed + rest == full


def test_load_state_dict_rejects_mismatched_settings():
    lengths = _lengths(100)
    state = LengthBucketSampler(lengths, 8, seed=1).state_dict()
    with pytest.raises(ValueError, match="seed"):
        LengthBucketSampler(lengths, 8, seed=2).load_state_dict(state)
    with pytest.raises(ValueError, match="batch_size"):
        LengthBucketSampler(lengths, 4, seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match="d:"):
        LengthBucketSampler(lengths, 8, seed=1).load_state_dict({"epoch": 0})


# ---------------------------------------------------------------------------------------------------------------
# DDP
# ---------------------------------------------------------------------------------------------------------------

def _shards(lengths, batch_size, world_size, epoch=0, **kw):
    out = []
    for rank in range(world_size):
        s = LengthBucketSampler(lengths, batch_size, rank=rank, world_size=world_size, **kw)
        s.set_epoch(epoch)
        out.append(list(s))
    return out


@pytest.mark.parametrize("n,batch_size,world_size", [(1003, 32, 2), (1003, 32, 3), (1003, 7, 4), (100, 8, 8)])
def test_ddp_shards_disjoint_covering_equal_steps(n, batch_size, world_size):
    shards = _shards(_lengths(n), batch_size, world_size, epoch=1, seed=3)
    assert len({len(s) for s in shards}) == 1  # every rank runs the same number of steps
    per_rank = [[i for b in s for i in b] for s in shards]
    flat = [i for r in per_rank for i in r]
    assert sorted(flat) == list(range(n))  # disjoint and covering
    assert all(1 <= len(b) <= batch_size for s in shards for b in s)


def test_ddp_drop_last_disjoint_equal():
    shards = _shards(_lengths(1003), 32, 3, drop_last=True)
    assert [len(s) for s in shards] == [10, 10, 10]
    flat = [i for s in shards for b in s for i in b]
    assert len(flat) == len(set(flat)) == 960


def test_ddp_tiny_dataset_repeats_rather_than_starves():
    shards = _shards(_lengths(5), 1, 4)  # 5 examples, 4 ranks, batch 1: 2 steps each, 3 examples repeated
    assert [len(s) for s in shards] == [2, 2, 2, 2]
    assert set(i for s in shards for b in s for i in b) == set(range(5))


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 400), batch_size=st.integers(1, 40), world_size=st.integers(1, 6), seed=st.integers(0, 99))
def test_ddp_property_equal_steps_and_coverage(n, batch_size, world_size, seed):
    lengths = _lengths(n, seed=seed)
    shards = _shards(lengths, batch_size, world_size, seed=seed)
    assert len({len(s) for s in shards}) == 1
    flat = [i for s in shards for b in s for i in b]
    assert set(flat) == set(range(n))
    if n >= len(flat):  # enough examples for every batch: exact partition
        assert len(flat) == n
    assert all(1 <= len(b) <= batch_size for s in shards for b in s)


def test_sampler_validation():
    with pytest.raises(ValueError, match="batch_size"):
        LengthBucketSampler([3, 4], 0)
    with pytest.raises(ValueError, match="rank"):
        LengthBucketSampler([3, 4], 1, rank=2, world_size=2)
    with pytest.raises(ValueError, match="lengths"):
        LengthBucketSampler([[3, 4]], 1)
    with pytest.raises(ValueError, match="lengths"):
        LengthBucketSampler([3, -1], 1)
    with pytest.raises(ValueError, match="lengths"):
        LengthBucketSampler([1.5, 2.0], 1)
    with pytest.raises(ValueError, match="batch_size"):
        LengthBucketSampler([3, 4], 4, drop_last=True)
    with pytest.raises(ValueError, match="epoch"):
        LengthBucketSampler([3, 4], 1).set_epoch(-1)
