"""Fault injection: what fastkd does when its inputs, files or processes go wrong (issue #15). Each case failed on
the code before its fix: it trained on garbage, kept a bad file, or died with a traceback instead of an error
that says what happened and what was kept."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fastkd import train
from tests.helpers import make_sentences, make_teacher
from tests.train_support import args_for


def _nan_teacher(folder: Path, *, head: bool) -> Path:
    from transformers import AutoModel, AutoModelForSequenceClassification

    make_teacher(folder, head=head)
    model = (AutoModelForSequenceClassification if head else AutoModel).from_pretrained(folder)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))
    model.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("mode", ["general", "task"])
@pytest.mark.parametrize("method", ["minilm", "minilmv2"])
def test_nan_teacher_stops_the_run_naming_field_layer_and_teacher(tiny, tmp_path, capsys, mode, method):
    """A NaN teacher gave loss 0.0 at every step, exit 0 and "student saved" with NaN weights (the softmax of the
    attention and relation losses zeroed it)."""
    teacher = _nan_teacher(tmp_path / "nan-teacher", head=mode == "task")
    out = tmp_path / "run"
    argv = args_for(tiny, out, method)
    argv[argv.index("--teacher") + 1] = str(teacher)
    if mode == "general":
        corpus = tmp_path / "corpus.txt"
        corpus.write_text("\n".join(t for t, _ in make_sentences(24, 5)) + "\n")
        argv += ["--mode", "general", "--general-corpus", str(corpus)]
    assert train.main(argv) == 2
    err = capsys.readouterr().err
    assert "produced NaN/inf in" in err and "layer" in err and str(teacher) in err, err
    assert not (out / "student").exists()
