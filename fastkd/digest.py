"""Every digest fastkd computes, in one place: file and model-folder digests, example digests, the fingerprints of
a model, tokenizer and tokenised dataset, and the canonical form of a cache key's parts.

All are sha256 hex digests. Changing any of them invalidates the caches keyed by it (the activation cache, the
fine-tuned teachers), so each is written once, here.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np
import torch


def _update_from_file(h, path: Path) -> None:
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)


def sha256_file(path: Path) -> str:
    """sha256 of one file's bytes."""
    h = hashlib.sha256()
    _update_from_file(h, path)
    return h.hexdigest()


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
        _update_from_file(h, f)
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



def sha256_json(parts, *, compact: bool = False) -> str:
    """sha256 of a JSON-serialisable value, keys sorted (compact separators when ``compact``)."""
    separators = (",", ":") if compact else None
    return hashlib.sha256(json.dumps(parts, sort_keys=True, separators=separators).encode()).hexdigest()


def canonical(value, where: str):
    """A cache-key part as JSON-safe data that compares exactly (floats by repr, sets sorted, dataclasses as
    dicts); anything else is refused, naming where it was."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return repr(value)  # exact, and NaN-safe for json
    if isinstance(value, torch.dtype):
        return str(value)
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, (list, tuple)):
        return [canonical(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, (set, frozenset)):
        return sorted(canonical(v, where) for v in value)
    if isinstance(value, dict):
        return {str(k): canonical(v, f"{where}.{k}") for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if hasattr(value, "__dataclass_fields__"):
        return canonical(dataclasses.asdict(value), where)
    raise ValueError(f"{where}: expected str, int, float, bool, None, dtype, Path, list, dict or dataclass in a "
                     f"cache key, got {type(value).__name__}; pass a fingerprint string instead")


def fingerprint_model(model: torch.nn.Module) -> str:
    """sha256 over a model's config (minus its load path and library version) and every parameter and buffer."""
    h = hashlib.sha256()
    config = getattr(model, "config", None)
    if config is not None:
        d = config.to_dict()
        for volatile in ("_name_or_path", "transformers_version", "_attn_implementation_autoset"):
            d.pop(volatile, None)
        h.update(json.dumps(d, sort_keys=True, default=str).encode())
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def fingerprint_tokenizer(tokenizer) -> str:
    """sha256 over a tokenizer's full definition (fast tokenizers) or its vocabulary and class."""
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    return h.hexdigest()


def fingerprint_dataset(ds, column: str = "input_ids") -> str:
    """sha256 over a tokenised dataset's token ids (and segment starts of sentence pairs) in row order: what the
    teacher actually sees."""
    import pyarrow as pa

    if column not in ds.column_names:
        raise ValueError(f"ds: expected a {column!r} column (from fastkd.data.tokenize), got {ds.column_names}")
    h = hashlib.sha256(f"{len(ds)};".encode())
    for table in ds.select_columns([column]).with_format("arrow").iter(batch_size=50_000):
        col = table.column(column).combine_chunks()
        if isinstance(col, pa.ChunkedArray):
            col = col.combine_chunks()
        h.update(col.value_lengths().to_numpy(zero_copy_only=False).astype(np.int64).tobytes())
        h.update(col.flatten().to_numpy(zero_copy_only=False).astype(np.int64).tobytes())
    if "type_start" in ds.column_names:  # sentence pairs: the segment ids are part of what the teacher sees
        h.update(b"type_start;" + np.asarray(ds["type_start"], dtype=np.int64).tobytes())
    return h.hexdigest()
