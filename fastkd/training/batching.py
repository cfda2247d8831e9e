"""Length-bucketed batching with dynamic padding, deterministic per (seed, epoch), DDP-sharded and resumable.

Why buckets: padding every batch to its own longest example wastes compute on pad tokens in proportion to the
length spread inside the batch. Sorting the whole data set by length would remove that waste but also the
randomness of SGD; sorting inside large shuffled buckets (``bucket_batches`` batches each) keeps batches random
across the epoch while their members have similar lengths. Batch order is then shuffled so that an epoch does not
run short-to-long inside every bucket.

DDP: every rank builds the same global list of batches (same seed and epoch), then takes every
``world_size``-th batch from its ``rank``. The number of global batches is a multiple of ``world_size``, so every
rank runs the same number of steps; with ``drop_last=False`` the examples are spread over those batches so that
shards are disjoint and cover the data (batch sizes then differ by at most one); only when there are too few
examples to give every batch one (fewer than about ``world_size`` per rank) are examples repeated.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class Batch:
    index: torch.Tensor  # [B] int64 example indices into the tokenised dataset (the teacher-cache keys)
    input_ids: torch.Tensor  # [B, L] int64, padded to the batch's longest example
    attention_mask: torch.Tensor  # [B, L] int64, 1 = real token
    labels: torch.Tensor | None  # [B] int64, or None for unlabelled data
    # [B, L] int64 segment ids of sentence pairs (0 up to the first [SEP], 1 after); None for single texts and for
    # tokenizers without segments (RoBERTa), where the model's own default applies.
    token_type_ids: torch.Tensor | None = None

    @property
    def lengths(self) -> torch.Tensor:
        """[B] number of real tokens per example."""
        return self.attention_mask.sum(dim=1)

    def model_inputs(self) -> dict[str, torch.Tensor]:
        """The keyword arguments of a transformers encoder call for this batch."""
        inputs = {"input_ids": self.input_ids, "attention_mask": self.attention_mask}
        if self.token_type_ids is not None:
            inputs["token_type_ids"] = self.token_type_ids
        return inputs

    def _map(self, fn) -> Batch:
        return Batch(*(None if t is None else fn(t) for t in (self.index, self.input_ids, self.attention_mask,
                                                                self.labels, self.token_type_ids)))

    def to(self, device, non_blocking: bool = False) -> Batch:
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> Batch:
        """Called by DataLoader(pin_memory=True) so host-to-device copies can overlap compute."""
        return self._map(lambda t: t.pin_memory())


def collate(features: list[dict], pad_token_id: int) -> Batch:
    """Stack tokenised examples (dicts with ``input_ids`` and ``index``, optionally ``label`` and, for sentence
    pairs, ``type_start``: where the second segment begins) into a :class:`Batch` padded on the right to the
    longest example of this batch."""
    if not features:
        raise ValueError("features: expected a non-empty list of examples, got an empty list")
    for key in ("input_ids", "index"):
        if key not in features[0]:
            raise ValueError(f"features: expected dicts with an {key!r} key (from fastkd.data.tokenize), "
                             f"got keys {sorted(features[0])}")
    lengths = [len(f["input_ids"]) for f in features]
    if min(lengths) == 0:
        raise ValueError("features: an example has no tokens; expected at least one input id per example")
    batch, width = len(features), max(lengths)
    input_ids = np.full((batch, width), int(pad_token_id), dtype=np.int64)
    attention_mask = np.zeros((batch, width), dtype=np.int64)
    types = np.zeros((batch, width), dtype=np.int64) if features[0].get("type_start") is not None else None
    for row, (f, n) in enumerate(zip(features, lengths, strict=True)):
        input_ids[row, :n] = f["input_ids"]
        attention_mask[row, :n] = 1
        if types is not None:
            types[row, int(f["type_start"]):n] = 1
    labels = None
    if "label" in features[0] and features[0]["label"] is not None:
        if isinstance(features[0]["label"], float):  # a regression target
            labels = torch.tensor([float(f["label"]) for f in features], dtype=torch.float32)
        else:
            labels = torch.tensor([int(f["label"]) for f in features], dtype=torch.long)
    token_type_ids = None if types is None else torch.from_numpy(types)
    index = torch.tensor([int(f["index"]) for f in features], dtype=torch.long)
    return Batch(index, torch.from_numpy(input_ids), torch.from_numpy(attention_mask), labels, token_type_ids)


class Collator:
    """A picklable ``collate_fn`` (DataLoader workers pickle it) bound to a pad token id."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = int(pad_token_id)

    def __call__(self, features: list[dict]) -> Batch:
        return collate(features, self.pad_token_id)


def _as_lengths(lengths) -> np.ndarray:
    if isinstance(lengths, torch.Tensor):
        lengths = lengths.detach().cpu().numpy()
    arr = np.asarray(lengths)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"lengths: expected a non-empty 1-D sequence of example lengths, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"lengths: expected integers, got dtype {arr.dtype}")
    if arr.min() < 0:
        raise ValueError(f"lengths: expected non-negative lengths, got minimum {int(arr.min())}")
    return arr.astype(np.int64)


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")
    return int(value)


class LengthBucketSampler:
    """Yields lists of example indices (a ``batch_sampler`` for ``torch.utils.data.DataLoader``).

    Deterministic for (seed, epoch): call :meth:`set_epoch` before each epoch. ``shuffle=False`` gives the
    evaluation order: the whole data set sorted by length (least padding), batches in that order.
    :meth:`state_dict` / :meth:`load_state_dict` resume mid-epoch: the batches after resuming are exactly the
    ones an uninterrupted run would have produced.
    """

    def __init__(self, lengths: Sequence[int] | np.ndarray | torch.Tensor, batch_size: int, *, seed: int = 0,
                 shuffle: bool = True, drop_last: bool = False, rank: int = 0, world_size: int = 1,
                 bucket_batches: int = 100):
        self.lengths = _as_lengths(lengths)
        self.batch_size = _positive_int("batch_size", batch_size)
        self.world_size = _positive_int("world_size", world_size)
        self.bucket_batches = _positive_int("bucket_batches", bucket_batches)
        if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or not 0 <= rank < self.world_size:
            raise ValueError(f"rank: expected an int in [0, world_size={self.world_size}), got {rank!r}")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed: expected a non-negative int, got {seed!r}")
        self.rank, self.seed = int(rank), int(seed)
        self.shuffle, self.drop_last = bool(shuffle), bool(drop_last)
        n, per_step = len(self.lengths), self.batch_size * self.world_size
        if drop_last and n < per_step:
            raise ValueError(f"batch_size: with drop_last=True, {n} examples make no full batch of {self.batch_size} "
                             f"on each of {self.world_size} ranks; lower batch_size or use drop_last=False")
        steps = n // per_step if drop_last else -(-n // per_step)
        self._num_global = steps * self.world_size  # a multiple of world_size: equal steps on every rank
        self.epoch = 0
        self._start = 0  # batches of this epoch to skip on the next __iter__ (resume)
        self._yielded = 0  # batches of this epoch handed out so far

    def __len__(self) -> int:
        return self._num_global // self.world_size

    def set_epoch(self, epoch: int) -> None:
        if isinstance(epoch, bool) or not isinstance(epoch, (int, np.integer)) or epoch < 0:
            raise ValueError(f"epoch: expected a non-negative int, got {epoch!r}")
        if int(epoch) != self.epoch:  # a new epoch starts from its first batch; the same epoch keeps a resume point
            self._start = 0
            self._yielded = 0
        self.epoch = int(epoch)

    def global_batches(self, epoch: int | None = None) -> list[np.ndarray]:
        """Every rank's batches of an epoch, in order; rank r runs entries r, r + world_size, ..."""
        epoch = self.epoch if epoch is None else epoch
        n = len(self.lengths)
        if not self.shuffle:
            order = np.argsort(self.lengths, kind="stable")
        else:
            rng = np.random.default_rng([self.seed, epoch])
            order = rng.permutation(n)
            bucket = self.batch_size * self.bucket_batches
            for start in range(0, n, bucket):  # sort inside each shuffled bucket; stable, so ties stay random
                chunk = order[start:start + bucket]
                order[start:start + bucket] = chunk[np.argsort(self.lengths[chunk], kind="stable")]
        if self.drop_last:
            order = order[: self._num_global * self.batch_size]
            batches = np.split(order, self._num_global)
        elif n >= self._num_global:
            batches = np.array_split(order, self._num_global)  # sizes differ by at most one
        else:  # too few examples for one per batch: repeat from the start, as DistributedSampler pads
            order = np.resize(order, self._num_global)
            batches = np.array_split(order, self._num_global)
        if self.shuffle:
            rng = np.random.default_rng([self.seed, epoch, 1])
            batches = [batches[i] for i in rng.permutation(len(batches))]
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        mine = self.global_batches()[self.rank::self.world_size]
        start, self._start = self._start, 0
        self._yielded = start
        for i in range(start, len(mine)):
            self._yielded = i + 1
            yield mine[i].tolist()

    def state_dict(self, batches_consumed: int | None = None) -> dict:
        """Where this epoch stands. By default the count of batches this sampler has handed out; a DataLoader with
        workers draws batches ahead of the training loop, so pass the number the loop actually consumed."""
        done = self._yielded if batches_consumed is None else int(batches_consumed)
        if not 0 <= done <= len(self):
            raise ValueError(f"batches_consumed: expected an int in [0, {len(self)}], got {batches_consumed!r}")
        return {"epoch": self.epoch, "batches_done": done, "seed": self.seed, "num_examples": len(self.lengths),
                "batch_size": self.batch_size, "world_size": self.world_size, "rank": self.rank,
                "shuffle": self.shuffle, "drop_last": self.drop_last, "bucket_batches": self.bucket_batches}

    def load_state_dict(self, d: dict) -> None:
        """Resume: the next ``__iter__`` continues epoch ``d["epoch"]`` after its first ``d["batches_done"]``
        batches. Settings that change the batches (seed, sizes, sharding) must match."""
        if not isinstance(d, dict) or "epoch" not in d or "batches_done" not in d:
            raise ValueError("d: expected a dict from LengthBucketSampler.state_dict()")
        mine = self.state_dict(0)
        for key in ("seed", "num_examples", "batch_size", "world_size", "rank", "shuffle", "drop_last",
                    "bucket_batches"):
            if key in d and d[key] != mine[key]:
                raise ValueError(f"d: {key}={d[key]!r} in the saved state but {mine[key]!r} here; an exact resume "
                                 f"needs the same {key}")
        self.epoch = int(d["epoch"])
        self._start = self._yielded = int(d["batches_done"])
        if not 0 <= self._start <= len(self):
            raise ValueError(f"d: batches_done={self._start} outside [0, {len(self)}]")


def padding_waste(lengths, batches) -> float:
    """Fraction of the padded token slots that are padding: Σ(B·max_len − Σlen) / Σ(B·max_len)."""
    lengths = _as_lengths(lengths)
    padded = real = 0
    for b in batches:
        member = lengths[np.asarray(b, dtype=np.int64)]
        padded += int(member.max()) * len(member)
        real += int(member.sum())
    return 1.0 - real / padded if padded else 0.0


def make_loader(ds, sampler: LengthBucketSampler, pad_token_id: int, *, num_workers: int = 0,
                pin_memory: bool = False) -> torch.utils.data.DataLoader:
    """A DataLoader over a tokenised dataset (from :func:`fastkd.data.tokenize`) yielding :class:`Batch`es."""
    columns = [c for c in ("input_ids", "index", "label", "type_start") if c in ds.column_names]
    return torch.utils.data.DataLoader(ds.select_columns(columns), batch_sampler=sampler,
                                       collate_fn=Collator(pad_token_id), num_workers=num_workers,
                                       pin_memory=pin_memory)
