import os
from pathlib import Path

import pytest
import torch

# Tests read the real data in place; default to ../shared/data beside the checkout.
os.environ.setdefault("FASTKD_DATA_DIR", str(Path(__file__).resolve().parents[2] / "shared" / "data"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

torch.set_num_threads(min(2, os.cpu_count() or 1))


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in float64."""
    out, ref = out.detach().double(), ref.detach().double()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


@pytest.fixture
def gen():
    """A fresh, seeded generator per test (fresh random inputs; reproducible failures)."""
    return torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little") if os.environ.get(
        "FASTKD_RANDOM_SEED") else 1234)


def make_mask(kind: str, B: int, L: int, gen: torch.Generator, device="cpu") -> torch.Tensor | None:
    """A [B, L] bool padding mask: "none" (None), "prefix" (random lengths), "single" (row 0 has one valid
    token), "holes" (arbitrary valid positions, not a prefix; at least one per row)."""
    if kind == "none":
        return None
    lens = torch.randint(1, L + 1, (B,), generator=gen)
    if kind == "single":
        lens[0] = 1
    m = torch.arange(L)[None] < lens[:, None]
    if kind == "holes":
        m = torch.rand(B, L, generator=gen) < 0.6
        m[torch.arange(B), torch.randint(0, L, (B,), generator=gen)] = True
    return m.to(device)
