"""Every code block of the README, as written. A Python block runs in a scope that holds only the objects its
prose says the reader has (``teacher``, ``student``, ``tokenizer``, ``batch``, ...), built tiny and offline, so
a missing import fails here as it would for a reader. A shell block's ``python -m fastkd.train`` lines are
parsed and checked by the CLI's own parser and config checks (running them is the main job's and the slow
tests' business: full-size runs, torchrun on 4 processes); its ``bash scripts/*.sh`` lines must name scripts
that exist."""

from __future__ import annotations

import math
import re
import shlex
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BLOCKS = re.findall(r"```(\w+)\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
PYTHON = [code for lang, code in BLOCKS if lang == "python"]
SHELL = [code for lang, code in BLOCKS if lang == "bash"]


def _block(first_line: str) -> str:
    found = [code for code in PYTHON if first_line in code]
    assert len(found) == 1, f"expected one README block containing {first_line!r}, found {len(found)}"
    return found[0]


def _run(code: str, **scope) -> dict:
    exec(compile(code, "README.md", "exec"), scope)
    return scope


def _bert(layers: int, hidden: int, heads: int, ffn: int, seed: int):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    return BertForSequenceClassification(BertConfig(
        vocab_size=32, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=ffn, max_position_embeddings=64, num_labels=2)).eval()


def _tokenizer(tmp_path):
    from tests.helpers import write_tokenizer

    return write_tokenizer(tmp_path / "tok")


def test_every_block_is_covered():
    # A new block gets its test here: these are the blocks the tests below run.
    assert len(PYTHON) == 5 and len(SHELL) == 3, [c.splitlines()[0] for c in PYTHON + SHELL]


def test_etd_block(tmp_path):
    from tests.helpers import make_sentences

    teacher = _bert(6, 384, 12, 1536, seed=0)  # the packaged MiniLM's shape, random weights
    tok = _tokenizer(tmp_path)
    enc = tok([t for t, _ in make_sentences(8, seed=1)], padding=True, return_tensors="pt")
    batches = [{**enc, "labels": torch.tensor([y for _, y in make_sentences(8, seed=1)])}]
    scope = _run(_block("from fastkd.etd import extract_student"), teacher=teacher, batches=batches)
    cfg = scope["student"].config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.intermediate_size) == (3, 192, 12,
                                                                                                         768)


def test_distillation_trainer_block(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    import datasets

    from tests.helpers import make_sentences

    monkeypatch.chdir(tmp_path)  # the block writes to "out"
    tok = _tokenizer(tmp_path)
    ds = datasets.DatasetDict({split: datasets.Dataset.from_dict(
        {"text": [t for t, _ in rows], "label": [y for _, y in rows]})
        for split, rows in (("train", make_sentences(16, 1)), ("validation", make_sentences(8, 2)))})
    scope = _run(_block("from fastkd.hf import DistillationTrainer"), teacher=_bert(4, 32, 4, 64, seed=0),
                 student=_bert(2, 32, 4, 64, seed=1), ds=ds, tokenizer=tok)
    assert [s.name for s in scope["trainer"].distiller.stages] == ["intermediate", "prediction"]
    from transformers import AutoModelForSequenceClassification

    assert AutoModelForSequenceClassification.from_pretrained(tmp_path / "out").config.num_hidden_layers == 2


def test_distiller_block(tmp_path):
    from tests.helpers import write_task

    data = write_task(tmp_path / "data")
    student = _bert(2, 32, 4, 64, seed=1)
    code = _block("from fastkd import Distiller")
    scope = _run(code, teacher=_bert(4, 32, 4, 64, seed=0), student=student, tokenizer=_tokenizer(tmp_path),
                 train_file=str(data / "train.tsv"), out_dir=str(tmp_path / "student"))
    assert len(code.strip().splitlines()) <= 22
    from transformers import AutoModelForSequenceClassification

    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "student")
    assert set(reloaded.state_dict()) == set(student.state_dict())
    assert scope["losses"] and all(math.isfinite(v) for v in scope["losses"])


def test_losses_block(tmp_path):
    # The block maps student layer 2 onto teacher layer 5, 12 heads each: a 6-layer teacher, a 3-layer student.
    tok = _tokenizer(tmp_path)
    batch = dict(tok(["the movie was good", "a bad film"], padding=True, return_tensors="pt"))
    student = _bert(3, 48, 12, 96, seed=1).train()
    scope = _run(_block("from fastkd import ActivationCapture"), teacher=_bert(6, 48, 12, 96, seed=0),
                 student=student, batch=batch)
    assert math.isfinite(float(scope["loss"])) and float(scope["loss"]) > 0
    assert student.bert.encoder.layer[2].attention.self.query.weight.grad is not None


def test_augment_block(tmp_path, monkeypatch):
    import datasets

    from tests.helpers import make_sentences, make_teacher

    monkeypatch.setenv("FASTKD_CACHE_DIR", str(tmp_path / "cache"))
    rows = make_sentences(6, seed=1)
    train_ds = datasets.Dataset.from_dict({"text": [t for t, _ in rows], "label": [y for _, y in rows]})
    scope = _run(_block("from fastkd.augment import"), train_ds=train_ds, teacher_dir=make_teacher(tmp_path / "t"))
    aug = scope["aug"]
    assert aug["text"][:6] == train_ds["text"] and len(aug) > 6 and (tmp_path / "cache" / "augmented").is_dir()


@pytest.mark.parametrize("i", range(3))
def test_shell_block(i):
    from fastkd.augment.__main__ import build_parser as augment_parser
    from fastkd.train import parse_config

    lines = [ln.split("#")[0].strip() for ln in SHELL[i].splitlines() if ln.split("#")[0].strip()]
    for line in lines:
        words = shlex.split(line)
        if words[0] == "bash":
            assert (ROOT / words[1]).is_file(), line
        elif words[:3] == ["python", "-m", "fastkd.train"]:
            parse_config(words[3:])
        elif words[:3] == ["python", "-m", "fastkd.augment"]:
            augment_parser().parse_args(words[3:])
        elif words[0] == "torchrun":
            assert words[words.index("-m") + 1] == "fastkd.train", line
            parse_config(words[words.index("-m") + 2:])
        else:
            raise AssertionError(f"README shell line of no known kind: {line}")
