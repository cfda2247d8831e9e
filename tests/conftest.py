import os
from pathlib import Path

import pytest
import torch

# The trainer tests' fixtures (tiny, one_thread).
pytest_plugins = ["tests.train_support"]

# Tests read the real data in place; default to ../shared/data beside the checkout.
os.environ.setdefault("FASTKD_DATA_DIR", str(Path(__file__).resolve().parents[2] / "shared" / "data"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture
def gen():
    """A fresh, seeded generator per test (fresh random inputs; reproducible failures)."""
    return torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little") if os.environ.get(
        "FASTKD_RANDOM_SEED") else 1234)


@pytest.fixture
def triton_backend(monkeypatch):
    """The fused Triton path for every loss call (the interpreter on a CPU), whatever the tensors' device."""
    monkeypatch.setenv("FASTKD_BACKEND", "triton")
