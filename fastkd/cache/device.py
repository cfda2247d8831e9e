"""Teacher activations kept in accelerator memory (``--cache device``).

The host caches (:class:`fastkd.cache.store.TeacherCache`) assemble each padded batch on the CPU, example by example and
field by field, and copy it to the GPU: tens of MiB per step, which for a small teacher on a fast GPU can cost more
than the forward it replaces. Here every field lives in one flat, token-major buffer on the device, allocated once
for the whole dataset (its lengths are known up front), and a batch is one ``index_select`` per field plus one
small copy of the gather positions.

Layout: a field whose batch tensor is ``[B, ..., L, ...]`` (one sequence dim) is stored as ``[tokens + 1, ...]``
with the sequence dim first and a last all-zero row that padding positions read; a field without a sequence dim
(e.g. logits) as ``[examples, ...]``. Fields with two sequence dims (L×L maps) are not supported: the recipes
capture Q/K instead.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


class DeviceCache:
    """Per-example teacher tensors on ``device``, keyed by the example's index in a dataset with ``lengths``.

    Same interface as :class:`fastkd.cache.store.TeacherCache` for the trainer: ``get(index, lengths)`` returns the
    padded
    batch (or None unless every example is stored), ``put(index, lengths, tensors, seq_dims)`` stores a batch,
    ``stats``, ``flush()``. ``budget_bytes``: when the whole dataset's fields would need more, nothing is allocated,
    every ``get`` misses and ``stats["note"]`` says why (the trainer then runs the teacher live).
    """

    def __init__(self, lengths: Sequence[int], device: torch.device | str, dtype: torch.dtype = torch.float16,
                 budget_bytes: int | None = None):
        self.lengths = np.asarray(lengths, dtype=np.int64)
        if self.lengths.ndim != 1 or len(self.lengths) == 0 or self.lengths.min() < 1:
            raise ValueError("lengths: expected one positive token count per example of the dataset")
        self.offsets = np.concatenate([[0], np.cumsum(self.lengths)])
        self.tokens = int(self.offsets[-1])
        self.device, self.dtype, self.budget = torch.device(device), dtype, budget_bytes
        self.stored = np.zeros(len(self.lengths), dtype=bool)
        self.buffers: dict[str, torch.Tensor] | None = None
        self.seq_dims: dict[str, int | None] = {}
        self.hits = self.misses = 0
        self.note: str | None = None

    @staticmethod
    def bytes_needed(lengths: Sequence[int], token_elems: int, example_elems: int = 0,
                     dtype: torch.dtype = torch.float16) -> int:
        """What the buffers take for a dataset with ``lengths``: ``token_elems`` values per token summed over the
        fields with a sequence dim (e.g. hidden size × number of such fields), ``example_elems`` per example over
        the others (e.g. the number of labels for logits)."""
        lengths = np.asarray(lengths, dtype=np.int64)
        elems = (int(lengths.sum()) + 1) * token_elems + len(lengths) * example_elems
        return elems * torch.finfo(dtype).bits // 8

    # -- layout ------------------------------------------------------------------------------------------------
    def _allocate(self, tensors: dict[str, torch.Tensor], seq_dims: dict[str, int | tuple | None]) -> bool:
        shapes, token_elems, example_elems = {}, 0, 0
        for name, t in tensors.items():
            sd = seq_dims.get(name)
            if isinstance(sd, tuple):
                raise ValueError(f"seq_dims[{name!r}]: the device cache stores one sequence dim per field, got {sd}")
            if sd is None:
                shapes[name] = (len(self.lengths), *t.shape[1:])
                example_elems += int(np.prod(t.shape[1:]))
            else:
                rest = [s for d, s in enumerate(t.shape) if d not in (0, sd)]
                shapes[name] = (self.tokens + 1, *rest)
                token_elems += int(np.prod(rest))
            self.seq_dims[name] = sd
        need = self.bytes_needed(self.lengths, token_elems, example_elems, self.dtype)
        if self.budget is not None and need > self.budget:
            self.note = (f"the dataset's teacher activations need {need / 2**30:.2f} GiB, over the device budget "
                         f"{self.budget / 2**30:.2f} GiB: running the teacher live")
            return False
        self.buffers = {name: torch.zeros(s, dtype=self.dtype, device=self.device) for name, s in shapes.items()}
        return True

    def _positions(self, ids: np.ndarray, lens: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, W] rows of the token-major buffers (padding -> the zero row) and the [B, W] mask of real tokens."""
        width = int(lens.max())
        steps = np.arange(width)[None, :]
        pos = self.offsets[ids][:, None] + steps
        valid = steps < lens[:, None]
        pos = np.where(valid, pos, self.tokens)
        return torch.from_numpy(pos), torch.from_numpy(valid)

    @staticmethod
    def _ids(index: torch.Tensor, lengths: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        if not isinstance(index, torch.Tensor) or index.dim() != 1 or index.is_floating_point():
            raise ValueError("index: expected a 1-D int tensor of example ids")
        if not isinstance(lengths, torch.Tensor) or lengths.shape != index.shape or lengths.is_floating_point():
            raise ValueError(f"lengths: expected an int tensor of shape {tuple(index.shape)} (one per index)")
        return index.cpu().numpy().astype(np.int64), lengths.cpu().numpy().astype(np.int64)

    # -- get / put ---------------------------------------------------------------------------------------------
    def get(self, index: torch.Tensor, lengths: torch.Tensor, *, count: bool = True) -> dict[str, torch.Tensor] | None:
        ids, lens = self._ids(index, lengths)
        if (self.buffers is None or ids.min() < 0 or ids.max() >= len(self.lengths) or not self.stored[ids].all()
                or not np.array_equal(self.lengths[ids], lens)):
            self.misses += count
            return None
        pos, _ = self._positions(ids, lens)
        pos = pos.to(self.device, non_blocking=True)
        rows = None
        out = {}
        for name, buf in self.buffers.items():
            sd = self.seq_dims[name]
            if sd is None:
                if rows is None:
                    rows = torch.from_numpy(ids).to(self.device, non_blocking=True)
                out[name] = buf.index_select(0, rows)
            else:
                got = buf.index_select(0, pos.view(-1)).view(*pos.shape, *buf.shape[1:])  # [B, W, rest...]
                # A strided view for Q/K ([B, H, W, dh] over [B, W, H, dh]), as the live capture hooks give them:
                # the losses read strides, so no copy.
                out[name] = got.movedim(1, sd)
        self.hits += count
        return out

    def put(self, index: torch.Tensor, lengths: torch.Tensor, tensors: dict[str, torch.Tensor],
            seq_dims: dict[str, int | tuple | None]) -> None:
        """Store a batch (batch-first tensors, sequence dim ``seq_dims[name]`` counted with the batch dim)."""
        ids, lens = self._ids(index, lengths)
        if not tensors:
            raise ValueError("tensors: expected a non-empty dict of name -> batch-first tensor")
        if ids.min() < 0 or ids.max() >= len(self.lengths):
            raise ValueError(f"index: expected example ids in [0, {len(self.lengths)}), got {ids.min()}..{ids.max()}")
        if not np.array_equal(self.lengths[ids], lens):
            raise ValueError("lengths: they differ from the dataset's lengths this cache was built for")
        if self.buffers is None and (self.note is not None or not self._allocate(tensors, seq_dims)):
            return  # over the budget: nothing is stored
        if set(tensors) != set(self.buffers):
            raise ValueError(f"tensors: expected the fields {sorted(self.buffers)}, got {sorted(tensors)}")
        new = ~self.stored[ids]
        if not new.any():
            return
        pos, valid = self._positions(ids, lens)
        keep = torch.from_numpy(new)
        dst_tokens = pos[valid & keep[:, None]].to(self.device)
        dst_rows = torch.from_numpy(ids[new]).to(self.device)
        rows = {}
        for name, t in tensors.items():  # select everything first: a non-finite field writes nothing at all
            sd = self.seq_dims[name]
            if sd is None:
                rows[name] = t[keep.to(t.device)]
            else:
                tm = t.movedim(sd, 1)  # [B, W, rest...]
                if tm.shape[1] < pos.shape[1]:
                    raise ValueError(f"tensors[{name!r}]: sequence dim {sd} has {tm.shape[1]} positions, fewer "
                                     f"than the batch's longest example ({pos.shape[1]})")
                rows[name] = tm[:, :pos.shape[1]][(valid & keep[:, None]).to(t.device)]
            if not torch.isfinite(rows[name]).all():
                raise ValueError(f"tensors[{name!r}]: non-finite values; not caching them")
        for name, r in rows.items():
            self.buffers[name].index_copy_(0, dst_rows if self.seq_dims[name] is None else dst_tokens,
                                           r.to(self.device, self.dtype))
        self.stored[ids] = True

    def flush(self) -> None:
        """Nothing to write: the buffers are the cache."""

    def refresh(self) -> None:
        """Nothing to read: no other rank shares this GPU's buffers."""

    def __len__(self) -> int:
        return int(self.stored.sum())

    @property
    def stats(self) -> dict:
        lookups = self.hits + self.misses
        nbytes = sum(b.numel() * b.element_size() for b in self.buffers.values()) if self.buffers else 0
        return {"mode": "device", "hits": self.hits, "misses": self.misses,
                "hit_rate": self.hits / lookups if lookups else 0.0, "examples": len(self), "bytes": nbytes,
                "device": str(self.device), "note": self.note}
