"""TeacherCache: run the teacher once, read its activations from memory or memory-mapped disk shards afterwards.

What is stored: exactly the tensors a recipe asks for, per example, without padding, in half precision (float16 by
default; pass ``dtype=torch.bfloat16`` when the teacher runs in bf16, whose range float16 cannot hold). Names follow
the capture convention: "emb", "hidden.{i}" [B, L, D] (seq dim 1), "q.{i}"/"k.{i}"/"v.{i}" [B, H, L, d] (seq dim 2),
"logits" [B, C] (no seq dim), and optionally "scores.{i}" [B, H, L, L] (seq dims 2 and 3).

Q/K versus scores (METHOD-NOTES): per example, head and layer, Q and K take 2·L·d values and the score map L·L, so
the score map is the smaller cache when L < 2·d — typical of short task data (SST-2: L ≈ 13 mean / 66 max tokens
with d = 32 or 64). :func:`prefer_scores` makes that choice; caching scores gives up recomputing other relations
(V-V, Q-Q) from the cache.

Disk layout, under ``<root>/<key>/`` (root: ``<$FASTKD_CACHE_DIR or ~/.cache/fastkd>/activations``):
  - ``rank{r}-shard{s:05d}.safetensors``: one flat buffer per tensor name (every example's values back to back)
    plus ``__index__`` (example ids) and ``__lengths__`` (tokens per example); the offsets follow from the lengths
    and the per-name shape template kept in the file's metadata. Read through a copy-on-write ``numpy.memmap``, so
    only the pages a batch touches are read.
  - ``manifest-rank{r}.json``: key, dtype, schema and every shard's size and sha256; written last and atomically,
    so a shard that is not in the manifest was never finished.
Every shard is checked against the manifest on open (size, sha256, header, offsets); a stale key, a missing,
truncated or altered file is reported with a logged warning and this rank's cache is rebuilt — never used. Under
DDP each rank writes its own files and reads every rank's (call :meth:`TeacherCache.refresh` after a barrier).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from fastkd.digest import (
    canonical,
    sha256_file,
    sha256_json,
)
from fastkd.disk import writing

log = logging.getLogger("fastkd.cache.store")

MODES = ("off", "memory", "disk")
FORMAT_VERSION = 1
_HALF_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
_ST_DTYPES = {torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64"}
_NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_.\-]*$")


def cache_root() -> Path:
    """fastkd's cache folder: ``$FASTKD_CACHE_DIR``, else ``~/.cache/fastkd`` (activations/ and teachers/ below it),
    so runs from any working directory share it."""
    env = os.environ.get("FASTKD_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "fastkd"


def default_root() -> Path:
    """Where disk-cache shards go by default: ``<cache_root>/activations``."""
    return cache_root() / "activations"


def prefer_scores(length: int, head_dim: int) -> bool:
    """True when a half-precision L×L score map per head is smaller than caching Q and K (L < 2·d)."""
    return length < 2 * head_dim


# ---------------------------------------------------------------------------------------------------------------
# Keys
# ---------------------------------------------------------------------------------------------------------------

# ---------------------------------------------------------------------------------------------------------------
# Disk shards
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class _Field:
    seq_dims: tuple[int, ...]  # dims of the per-example tensor (batch dim removed) that run over tokens
    shape: tuple[int, ...]  # per-example shape with -1 at the seq dims

    def example_shape(self, length: int) -> tuple[int, ...]:
        return tuple(length if d in self.seq_dims else s for d, s in enumerate(self.shape))

    def numel(self, lengths: np.ndarray) -> np.ndarray:
        fixed = math.prod(s for d, s in enumerate(self.shape) if d not in self.seq_dims)
        return fixed * lengths.astype(np.int64) ** len(self.seq_dims)


class CacheCorrupt(Exception):
    """A shard or manifest failed verification (internal: turned into a warning and a rebuild)."""


def _write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """The safetensors layout (8-byte header size, JSON header, raw little-endian data), written directly so the
    flat buffers go to disk without an extra copy; readable by ``safetensors.safe_open``."""
    header, offset = {"__metadata__": metadata}, 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # align the data section
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for t in tensors.values():
            f.write(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        f.flush()
        os.fsync(f.fileno())


class _Shard:
    """A verified, memory-mapped shard: where each example's values lie in each flat buffer."""

    def __init__(self, path: Path, dtype: torch.dtype, fields: dict[str, _Field]):
        size = path.stat().st_size
        if size < 8:
            raise CacheCorrupt(f"{path.name} is truncated ({size} bytes)")
        mm = np.memmap(path, dtype=np.uint8, mode="c")
        (header_len,) = struct.unpack("<Q", mm[:8].tobytes())
        if header_len > size - 8:
            raise CacheCorrupt(f"{path.name}: header length {header_len} exceeds the file size {size}")
        try:
            header = json.loads(mm[8:8 + header_len].tobytes())
        except ValueError as e:
            raise CacheCorrupt(f"{path.name}: unreadable header ({e})") from e
        base = 8 + header_len
        self.mm, self.dtype = mm, dtype

        def buffer(name: str, st_dtype: str, torch_dtype: torch.dtype) -> torch.Tensor:
            entry = header.get(name)
            if entry is None or entry.get("dtype") != st_dtype:
                raise CacheCorrupt(f"{path.name}: tensor {name!r} missing or not {st_dtype}")
            begin, end = entry["data_offsets"]
            if not 0 <= begin <= end <= size - base:
                raise CacheCorrupt(f"{path.name}: tensor {name!r} lies outside the file")
            raw = mm[base + begin: base + end]
            item = torch.tensor([], dtype=torch_dtype).element_size()
            if (end - begin) % item:
                raise CacheCorrupt(f"{path.name}: tensor {name!r} has a partial element")
            return torch.from_numpy(raw).view(torch_dtype) if end > begin else torch.empty(0, dtype=torch_dtype)

        self.index = buffer("__index__", "I64", torch.int64)
        self.lengths = buffer("__lengths__", "I64", torch.int64)
        if self.index.numel() != self.lengths.numel():
            raise CacheCorrupt(f"{path.name}: {self.index.numel()} ids but {self.lengths.numel()} lengths")
        lengths = self.lengths.numpy()
        if lengths.size and lengths.min() < 1:
            raise CacheCorrupt(f"{path.name}: non-positive example length")
        self.flat: dict[str, torch.Tensor] = {}
        self.offsets: dict[str, np.ndarray] = {}
        for name, field in fields.items():
            flat = buffer(name, _ST_DTYPES[dtype], dtype)
            offsets = np.concatenate([[0], np.cumsum(field.numel(lengths))])
            if offsets[-1] != flat.numel():
                raise CacheCorrupt(f"{path.name}: tensor {name!r} holds {flat.numel()} values, the lengths "
                                   f"say {int(offsets[-1])}")
            self.flat[name], self.offsets[name] = flat, offsets

    def example(self, pos: int, name: str, field: _Field) -> torch.Tensor:
        lo, hi = self.offsets[name][pos], self.offsets[name][pos + 1]
        return self.flat[name][lo:hi].view(field.example_shape(int(self.lengths[pos])))


# ---------------------------------------------------------------------------------------------------------------
# The cache
# ---------------------------------------------------------------------------------------------------------------

def _field_of(name: str, t, seq_dims: dict, batch: int, width: int, dtype: torch.dtype) -> tuple[_Field, torch.Tensor]:
    """One named batch tensor checked and converted for storing: (its per-example layout, the tensor in ``dtype``
    on the CPU). Non-finite values (or an fp16 overflow) raise rather than being cached."""
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ValueError(f"tensors: expected names like 'hidden.3' (a letter, then letters, digits, '.', '_' "
                         f"or '-'), got {name!r}")
    if not isinstance(t, torch.Tensor) or not t.is_floating_point():
        raise ValueError(f"tensors[{name!r}]: expected a floating tensor, got "
                         f"{getattr(t, 'dtype', type(t).__name__)}")
    if t.dim() < 1 or t.shape[0] != batch:
        raise ValueError(f"tensors[{name!r}]: expected batch dim {batch} first, got {tuple(t.shape)}")
    if name not in seq_dims:
        raise ValueError(f"seq_dims: expected an entry for {name!r} (an int, a tuple or None)")
    dims = seq_dims[name]
    dims = () if dims is None else (dims,) if isinstance(dims, int) else tuple(dims)
    if any(not isinstance(d, int) or isinstance(d, bool) or not 1 <= d < t.dim() for d in dims):
        raise ValueError(f"seq_dims[{name!r}]: expected dims in [1, {t.dim() - 1}] of a {t.dim()}-D tensor, "
                         f"got {seq_dims[name]!r}")
    for d in dims:
        if t.shape[d] < width:
            raise ValueError(f"tensors[{name!r}]: dim {d} has size {t.shape[d]}, shorter than the longest "
                             f"length {width}")
    half = t.detach().to(dtype).cpu()  # convert before the copy: half the bytes cross the bus
    if not bool(torch.isfinite(half).all()):
        source_finite = bool(torch.isfinite(t).all())
        raise ValueError(f"tensors[{name!r}]: " + (
            f"overflows {dtype} (max |value| {float(t.detach().abs().max()):.4g}); cache in "
            f"dtype=torch.bfloat16" if source_finite else "holds NaN or inf values; refusing to cache them"))
    per_example = tuple(-1 if d + 1 in dims else s for d, s in enumerate(t.shape[1:]))
    return _Field(tuple(d - 1 for d in dims), per_example), half


def check_index(index, lengths) -> tuple[list[int], list[int]]:
    """A batch's example ids and token counts as lists (the key of every get and put)."""
    if not isinstance(index, torch.Tensor) or index.dim() != 1 or index.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"index: expected a 1-D int64 tensor of example ids, got "
                         f"{getattr(index, 'shape', type(index).__name__)} {getattr(index, 'dtype', '')}")
    if not isinstance(lengths, torch.Tensor) or lengths.shape != index.shape or lengths.is_floating_point():
        raise ValueError(f"lengths: expected an int tensor of shape {tuple(index.shape)} (one length per index), "
                         f"got {getattr(lengths, 'shape', type(lengths).__name__)}")
    ids, lens = index.tolist(), lengths.tolist()
    if index.numel() == 0:
        raise ValueError("index: expected at least one example id, got an empty tensor")
    if min(lens) < 1:
        raise ValueError(f"lengths: expected every length >= 1, got {min(lens)}")
    if min(ids) < 0:
        raise ValueError(f"index: expected non-negative example ids, got {min(ids)}")
    return ids, lens


class ActivationCache(Protocol):
    """What the trainer asks of a teacher-activation cache; :class:`TeacherCache` (memory or disk shards) and
    :class:`fastkd.cache.device.DeviceCache` (GPU buffers) implement it."""

    def get(self, index: torch.Tensor, lengths: torch.Tensor, *, count: bool = True) -> dict[str, torch.Tensor] | None:
        """Every field of the batch's examples (None unless all of them are stored)."""

    dtype: torch.dtype  # what get returns (and what the trainer rounds live activations to)

    def put(self, index: torch.Tensor, lengths: torch.Tensor, tensors: dict[str, torch.Tensor],
            seq_dims: dict[str, int | tuple | None]) -> None:
        """Store a batch's fields (padding dropped)."""

    def flush(self) -> None:
        """Make what was stored durable (disk) or visible to the other ranks after :meth:`refresh`."""

    def refresh(self) -> None:
        """Read what other ranks flushed (call after a barrier)."""

    @property
    def stats(self) -> dict:
        """mode, hits, misses, hit_rate, examples, bytes (and an optional note)."""


class TeacherCache:
    """Teacher activations per example, keyed by :meth:`make_key`. ``mode``: "off" (every get misses, put does
    nothing), "memory" (this process only) or "disk" (memory-mapped shards, reused by later runs).

    Usage: ``t = cache.get(batch.index, batch.lengths)``; on None run the teacher and ``cache.put(...)``; call
    :meth:`flush` at the end of each epoch (disk mode writes the remaining shard and the manifest).
    """

    def __init__(self, mode: str, root: Path | str | None = None, key: str = "", *,
                 dtype: torch.dtype = torch.float16, rank: int | None = None, shard_bytes: int = 256 << 20,
                 verify: bool = True):
        if mode not in MODES:
            raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
        if dtype not in (torch.float16, torch.bfloat16):
            raise ValueError(f"dtype: expected torch.float16 or torch.bfloat16, got {dtype}")
        if mode == "disk" and (not isinstance(key, str) or not re.fullmatch(r"[0-9A-Za-z_\-]{8,128}", key)):
            raise ValueError(f"key: expected a string of 8 to 128 letters, digits, '-' or '_' (from make_key), "
                             f"got {key!r}")
        if rank is None:
            rank = int(os.environ.get("RANK", "0"))
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
            raise ValueError(f"rank: expected a non-negative int, got {rank!r}")
        if isinstance(shard_bytes, bool) or not isinstance(shard_bytes, int) or shard_bytes < 1:
            raise ValueError(f"shard_bytes: expected a positive int, got {shard_bytes!r}")
        self.mode, self.key, self.dtype, self.rank = mode, key, dtype, rank
        self.shard_bytes, self.verify = shard_bytes, verify
        self.root = Path(root).expanduser() if root is not None else default_root()
        self.dir = self.root / key if mode == "disk" else None
        self.fields: dict[str, _Field] | None = None
        self.hits = self.misses = 0
        self._pending: dict[int, dict[str, torch.Tensor]] = {}  # written to no shard yet (all of memory mode)
        self._pending_len: dict[int, int] = {}
        self._pending_bytes = 0
        self._where: dict[int, tuple[_Shard, int]] = {}  # example id -> (shard, position), disk mode
        self._own_shards: list[dict] = []  # this rank's manifest entries
        self._shard_bytes_total = 0
        self._loaded_files: set[str] = set()
        self._warned_length = False
        if mode == "disk":
            self.dir.mkdir(parents=True, exist_ok=True)
            self._open_own()
            self._open_others()

    # -- keys ------------------------------------------------------------------------------------------------
    @staticmethod
    def make_key(**parts) -> str:
        """sha256 (hex) over named parts: teacher identity (:func:`fingerprint_model`), data
        (:func:`fingerprint_dataset`), tokenizer (:func:`fingerprint_tokenizer`), max_length, teacher dtype and the
        recipe's captured fields. Order-independent in the part names; any change in a value changes the key."""
        if not parts:
            raise ValueError("parts: expected at least one named part (teacher, data, tokenizer, ...)")
        key = {name: canonical(value, name) for name, value in parts.items()}
        key["__format__"] = FORMAT_VERSION
        return sha256_json(key, compact=True)

    # -- disk: open, verify, rebuild ---------------------------------------------------------------------------
    def _manifest_path(self, rank: int) -> Path:
        return self.dir / f"manifest-rank{rank}.json"

    def _load_manifest(self, rank: int) -> tuple[dict[str, _Field], list[tuple[_Shard, dict]]]:
        path = self._manifest_path(rank)
        try:
            manifest = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise CacheCorrupt(f"{path.name} is unreadable ({e})") from e
        if manifest.get("key") != self.key:
            raise CacheCorrupt(f"{path.name} was written for key {manifest.get('key')!r}, not {self.key!r} (stale)")
        if manifest.get("format") != FORMAT_VERSION:
            raise CacheCorrupt(f"{path.name} has format {manifest.get('format')!r}, expected {FORMAT_VERSION}")
        if _HALF_DTYPES.get(manifest.get("dtype")) != self.dtype:
            raise CacheCorrupt(f"{path.name} stores {manifest.get('dtype')}, this run asks for {self.dtype}")
        try:
            fields = {name: _Field(tuple(f["seq_dims"]), tuple(f["shape"])) for name, f in manifest["schema"].items()}
            entries = list(manifest["shards"])
        except (KeyError, TypeError) as e:
            raise CacheCorrupt(f"{path.name} is malformed ({e})") from e
        shards = []
        for entry in entries:
            shard_path = self.dir / entry["file"]
            if not shard_path.is_file():
                raise CacheCorrupt(f"{entry['file']} is missing")
            size = shard_path.stat().st_size
            if size != entry["bytes"]:
                raise CacheCorrupt(f"{entry['file']} has {size} bytes, the manifest says {entry['bytes']} "
                                   f"(truncated or altered)")
            if self.verify and sha256_file(shard_path) != entry["sha256"]:
                raise CacheCorrupt(f"{entry['file']} fails its sha256 checksum (altered)")
            shards.append((_Shard(shard_path, self.dtype, fields), entry))
        return fields, shards

    def _own_files(self) -> list[Path]:
        return sorted(self.dir.glob(f"rank{self.rank}-shard*.safetensors")) + sorted(
            self.dir.glob(f"rank{self.rank}-shard*.tmp"))

    def _wipe_own(self) -> None:
        for p in self._own_files() + [self._manifest_path(self.rank)]:
            p.unlink(missing_ok=True)

    def _open_own(self) -> None:
        manifest = self._manifest_path(self.rank)
        if not manifest.exists():
            if self._own_files():
                log.warning("teacher cache %s: rank %d has shards but no manifest (an interrupted write); "
                            "rebuilding", self.dir, self.rank)
                self._wipe_own()
            return
        try:
            fields, shards = self._load_manifest(self.rank)
        except CacheCorrupt as e:
            log.warning("teacher cache %s: %s; discarding rank %d's cache and rebuilding it", self.dir, e, self.rank)
            self._wipe_own()
            return
        listed = {entry["file"] for _, entry in shards}
        for orphan in self._own_files():
            if orphan.name not in listed:
                log.warning("teacher cache %s: %s is not in the manifest (an interrupted write); removing it",
                            self.dir, orphan.name)
                orphan.unlink(missing_ok=True)
        self.fields = fields
        for shard, entry in shards:
            self._add_shard(shard, entry)
            self._own_shards.append(entry)

    def _open_others(self) -> None:
        for manifest in sorted(self.dir.glob("manifest-rank*.json")):
            m = re.fullmatch(r"manifest-rank(\d+)\.json", manifest.name)
            if not m or int(m.group(1)) == self.rank:
                continue
            try:
                fields, shards = self._load_manifest(int(m.group(1)))
            except CacheCorrupt as e:
                log.warning("teacher cache %s: %s; not reading rank %s's cache", self.dir, e, m.group(1))
                continue
            if self.fields is not None and fields != self.fields:
                log.warning("teacher cache %s: rank %s stored other tensors; not reading it", self.dir, m.group(1))
                continue
            self.fields = fields
            for shard, entry in shards:
                if entry["file"] not in self._loaded_files:
                    self._add_shard(shard, entry)

    def _add_shard(self, shard: _Shard, entry: dict) -> None:
        self._loaded_files.add(entry["file"])
        for pos, example in enumerate(shard.index.tolist()):
            self._where.setdefault(example, (shard, pos))
        self._shard_bytes_total += entry["bytes"]

    def refresh(self) -> None:
        """Read the shards other ranks have flushed since this cache was opened (call after a barrier)."""
        if self.mode == "disk":
            self._open_others()

    # -- get / put -------------------------------------------------------------------------------------------
    def _lookup(self, example: int) -> tuple[int, callable] | None:
        """(stored length, name -> unpadded tensor) for a stored example, else None."""
        if example in self._pending:
            stored = self._pending[example]
            return self._pending_len[example], lambda name, field: stored[name]
        hit = self._where.get(example)
        if hit is None:
            return None
        shard, pos = hit
        return int(shard.lengths[pos]), lambda name, field: shard.example(pos, name, field)

    def get(self, index: torch.Tensor, lengths: torch.Tensor, *, count: bool = True) -> dict[str, torch.Tensor] | None:
        """The stored tensors for a batch, re-padded with zeros to ``max(lengths)`` along their seq dims, in the
        cache dtype, on the CPU; None (a miss) unless every example of the batch is stored."""
        ids, lens = check_index(index, lengths)
        if self.mode == "off" or self.fields is None:
            self.misses += count
            return None
        found = []
        for example, length in zip(ids, lens, strict=True):
            hit = self._lookup(example)
            if hit is None:
                self.misses += count
                return None
            if hit[0] != length:
                if not self._warned_length:
                    log.warning("teacher cache: example %d was stored with %d tokens but the batch has %d; the "
                                "tokenisation changed without changing the key, so this batch is recomputed",
                                example, hit[0], length)
                    self._warned_length = True
                self.misses += count
                return None
            found.append(hit[1])
        width = max(lens)
        out = {}
        for name, field in self.fields.items():
            t = torch.zeros((len(ids), *field.example_shape(width)), dtype=self.dtype)
            for row, (read, length) in enumerate(zip(found, lens, strict=True)):
                region = (row, *(slice(0, length) if d in field.seq_dims else slice(None)
                                 for d in range(len(field.shape))))
                t[region] = read(name, field)
            out[name] = t
        self.hits += count
        return out

    def put(self, index: torch.Tensor, lengths: torch.Tensor, tensors: dict[str, torch.Tensor],
            seq_dims: dict[str, int | tuple[int, ...] | None]) -> None:
        """Store a batch's tensors per example (``index``), cut to each example's length along ``seq_dims[name]``
        (an int, a tuple of ints such as (2, 3) for scores, or None), converted to the cache dtype. Examples already
        stored are skipped. Non-finite values raise ValueError rather than being cached."""
        ids, lens = check_index(index, lengths)
        if self.mode == "off":
            return
        if not isinstance(tensors, dict) or not tensors:
            raise ValueError("tensors: expected a non-empty dict of name -> batch-first tensor")
        fields, converted = {}, {}
        width = max(lens)
        for name, t in tensors.items():
            fields[name], converted[name] = _field_of(name, t, seq_dims, len(ids), width, self.dtype)
        if self.fields is None:
            self.fields = fields
        elif fields != self.fields:
            raise ValueError(f"tensors: this cache stores {self._describe(self.fields)}, got "
                             f"{self._describe(fields)}; a different recipe needs a different key")
        for row, (example, length) in enumerate(zip(ids, lens, strict=True)):
            if example in self._pending or example in self._where:
                continue
            stored = {}
            for name, field in fields.items():
                region = tuple(slice(0, length) if d in field.seq_dims else slice(None)
                               for d in range(len(field.shape)))
                stored[name] = converted[name][row][region].clone()  # clone: drop the padded batch storage
                self._pending_bytes += stored[name].numel() * stored[name].element_size()
            self._pending[example], self._pending_len[example] = stored, length
        if self.mode == "disk" and self._pending_bytes >= self.shard_bytes:
            self.flush()

    @staticmethod
    def _describe(fields: dict[str, _Field]) -> str:
        return ", ".join(f"{n}{list(f.shape)} seq{list(f.seq_dims)}" for n, f in sorted(fields.items()))

    # -- flush -----------------------------------------------------------------------------------------------
    def flush(self) -> None:
        """Disk mode: write the examples stored since the last flush as a shard, then the manifest (atomically).
        Memory and off modes: nothing to do."""
        if self.mode != "disk" or not self._pending:
            return
        ids = sorted(self._pending)
        number = 1 + max((int(re.search(r"shard(\d+)", p.name).group(1)) for p in self._own_files()), default=-1)
        name = f"rank{self.rank}-shard{number:05d}.safetensors"
        tensors = {"__index__": torch.tensor(ids, dtype=torch.int64),
                   "__lengths__": torch.tensor([self._pending_len[i] for i in ids], dtype=torch.int64)}
        for field_name in self.fields:
            tensors[field_name] = torch.cat([self._pending[i][field_name].reshape(-1) for i in ids])
        schema = {n: {"seq_dims": list(f.seq_dims), "shape": list(f.shape)} for n, f in self.fields.items()}
        tmp = self.dir / (name + ".tmp")
        kept = f"the {len(self._own_shards)} shard(s) written before are kept and verified"
        with writing(tmp, f"teacher-cache shard {name}", kept):
            _write_safetensors(tmp, tensors, {"key": self.key, "schema": json.dumps(schema, sort_keys=True)})
        os.replace(tmp, self.dir / name)
        entry = {"file": name, "bytes": (self.dir / name).stat().st_size, "sha256": sha256_file(self.dir / name),
                 "examples": len(ids)}
        self._own_shards.append(entry)
        manifest = {"format": FORMAT_VERSION, "key": self.key, "rank": self.rank,
                    "dtype": str(self.dtype).removeprefix("torch."), "schema": schema, "shards": self._own_shards}
        tmp = self.dir / f"manifest-rank{self.rank}.json.tmp"
        with writing(tmp, "the teacher cache's manifest", kept):
            tmp.write_text(json.dumps(manifest, indent=1))
        os.replace(tmp, self._manifest_path(self.rank))
        self._add_shard(_Shard(self.dir / name, self.dtype, self.fields), entry)
        self._pending.clear()
        self._pending_len.clear()
        self._pending_bytes = 0

    # -- reporting -------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._pending) + len(self._where)

    def __contains__(self, example: int) -> bool:
        return int(example) in self._pending or int(example) in self._where

    @property
    def stats(self) -> dict:
        """hits and misses count batches (a batch hits only when every example is stored); bytes is the stored
        size (shards on disk plus what is not flushed yet)."""
        lookups = self.hits + self.misses
        return {"mode": self.mode, "hits": self.hits, "misses": self.misses,
                "hit_rate": self.hits / lookups if lookups else 0.0, "examples": len(self),
                "bytes": self._shard_bytes_total + self._pending_bytes,
                "path": str(self.dir) if self.dir is not None else None}
