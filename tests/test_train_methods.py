"""The trainer end to end, method by method, on a tiny random BERT teacher and tiny local TSVs."""

from __future__ import annotations

import pytest
import torch

from fastkd import train
from fastkd.distill import distiller as distill
from tests.helpers import make_sentences, make_teacher, tiny_bert_config
from tests.train_support import args_for, read_metrics, run_cli


@pytest.mark.parametrize("method", ["kd", "tinybert", "minilm", "minilmv2", "pkd-last", "pkd-skip", "bert-emd"])
def test_each_method_end_to_end(tiny, tmp_path, method):
    out = tmp_path / "run"
    extra = ["--set", "minilmv2.relation_heads=8"] if method == "minilmv2" else []
    res = run_cli(args_for(tiny, out, method, *extra))
    recipe = res["trainer"].recipe
    metrics = read_metrics(out)
    steps = [m for m in metrics if "loss" in m and "event" not in m]
    # Every stage trained and logged every loss term of its recipe, all finite.
    for stage in recipe.stages:
        mine = [m for m in steps if m["stage"] == stage.name]
        assert mine, f"stage {stage.name} logged no step"
        for term in stage.terms:
            vals = [m[f"loss_{term.kind}"] for m in mine]
            assert all(torch.isfinite(torch.tensor(v)) for v in vals), (term.kind, vals)
    assert 0.0 <= res["student_test_acc"] <= 1.0 and res["test_examples"] == 16
    assert res["student_params"] < res["teacher_params"]
    # The saved student is a sequence classifier transformers loads directly, with a tokenizer.
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    student = AutoModelForSequenceClassification.from_pretrained(out / "student")
    assert student.config.num_hidden_layers == 2 and student.config.num_labels == 2
    AutoTokenizer.from_pretrained(out / "student")
    assert (out / "loss.png").stat().st_size > 1000


def test_general_mode_on_unlabelled_text(tiny, tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(t for t, _ in make_sentences(40, 5)) + "\n")
    out = tmp_path / "run"
    argv = args_for(tiny, out, "minilmv2", "--mode", "general", "--general-corpus", str(corpus), "--set",
                    "minilmv2.relation_heads=8")
    res = run_cli(argv)
    steps = [m for m in read_metrics(out) if "loss" in m and "event" not in m]
    assert {m["stage"] for m in steps} == {"distill"} and len(steps) == 5  # 40 texts / batch 8
    assert "student_test_acc" not in res
    from transformers import AutoModel

    student = AutoModel.from_pretrained(out / "student")  # the encoder, ready for any task head
    assert student.config.num_hidden_layers == 2


def test_tinybert_two_stages_and_learning(tiny, tmp_path):
    out = tmp_path / "run"
    # A random-init student (--etd none) with a learning rate a tiny model can move with in 12 steps.
    run_cli(args_for(tiny, out, "tinybert", "--set", "tinybert.inter_epochs=2", "--set", "tinybert.inter_lr=1e-3",
                     "--epochs", "2"))
    steps = [m for m in read_metrics(out) if "loss" in m and "event" not in m]
    stages = [m["stage"] for m in steps]
    assert stages[0] == "intermediate" and stages[-1] == "prediction"
    assert stages == sorted(stages, key=["intermediate", "prediction"].index)  # stage 1 then stage 2
    inter = [m for m in steps if m["stage"] == "intermediate"]
    assert set(inter[0]) >= {"loss_emb_mse", "loss_hidden_mse", "loss_att_mse", "lr", "samples_per_s"}
    assert "loss_soft_ce" not in inter[0]
    # The intermediate losses drop over the stage (the student learns to match the teacher).
    assert inter[-1]["loss"] < 0.8 * inter[0]["loss"]


def test_ernie_tiny_four_stages_and_finetuned_teacher(tiny, tmp_path, monkeypatch):
    # A teacher without a task head: fastkd fine-tunes it first and caches the result on disk.
    teacher = make_teacher(tmp_path / "bare", head=False)
    monkeypatch.setenv("FASTKD_CACHE_DIR", str(tmp_path / "cache"))
    general = tmp_path / "general.txt"
    general.write_text("\n".join(t for t, _ in make_sentences(24, 9)) + "\n")
    out = tmp_path / "run"
    argv = args_for(tiny, out, "ernie-tiny", "--general-corpus", str(general), "--finetune-epochs", "1")
    argv[argv.index("--teacher") + 1] = str(teacher)
    run_cli(argv)
    steps = [m for m in read_metrics(out) if "loss" in m and "event" not in m]
    names = list(dict.fromkeys(m["stage"] for m in steps))
    assert names == ["general", "general-enhanced", "task-adaptive", "task-specific"]
    assert "loss_hard_ce" in [m for m in steps if m["stage"] == "task-specific"][0]
    assert "loss_soft_ce" not in [m for m in steps if m["stage"] == "task-adaptive"][0]
    cached = list((tmp_path / "cache" / "teachers").iterdir())
    assert len(cached) == 1 and (cached[0] / "fastkd-finetune.json").is_file()
    stamp = (cached[0] / "config.json").stat().st_mtime_ns
    # A second run reuses the cached fine-tuned teacher (same key), it does not fine-tune again.
    out2 = tmp_path / "run2"
    argv[argv.index("--output-dir") + 1] = str(out2)
    argv[argv.index("--method") + 1] = "kd"
    logs = []
    cfg = train.parse_config(argv)
    train.run(cfg, log=logs.append)
    assert any("reusing the fine-tuned teacher" in x for x in logs)
    assert (cached[0] / "config.json").stat().st_mtime_ns == stamp


def test_bert_emd_layer_weights_update(tiny, tmp_path):
    out = tmp_path / "run"
    run_cli(args_for(tiny, out, "bert-emd", "--epochs", "2"))
    steps = [m for m in read_metrics(out) if "emd_w_s" in m]
    assert len(steps) >= 4
    w0 = torch.tensor(steps[0]["emd_w_s"])
    wn = torch.tensor(steps[-1]["emd_w_s"])
    assert len(steps[0]["emd_w_t"]) == 4 and len(steps[0]["emd_w_s"]) == 2
    for m in steps:  # histograms: positive, summing to one
        assert abs(sum(m["emd_w_s"]) - 1) < 1e-4 and abs(sum(m["emd_w_t"]) - 1) < 1e-4
        assert min(m["emd_w_s"]) > 0 and min(m["emd_w_t"]) > 0
    assert not torch.allclose(w0, wn) or not torch.allclose(torch.tensor(steps[0]["emd_w_t"]),
                                                             torch.tensor(steps[-1]["emd_w_t"]))
    assert not torch.allclose(torch.tensor(steps[-1]["emd_w_t"]), torch.full((4,), 0.25))


def test_pkd_narrow_student_projects_cls(tiny, tmp_path):
    """A narrower PKD student compares W·[CLS] with the teacher's [CLS]; W learns from the patience loss."""
    out = tmp_path / "run"
    res = run_cli(args_for(tiny, out, "pkd-skip", "--etd", "rand", "--student-hidden", "16", "--student-ffn", "32"))
    module = res["trainer"].module
    assert module.fit is not None and module.fit.in_features == 16 and module.fit.out_features == 32
    steps = [m for m in read_metrics(out) if "loss_pkd" in m]
    assert steps and all(0.0 < m["loss_pkd"] < float("inf") for m in steps)
    # ETD started W as the kept-dimension selection (16 ones, zeros elsewhere). Weight decay cannot make a zero
    # non-zero, so non-zero entries beyond the 16 mean the patience loss's gradient reached W.
    assert int((module.fit.weight.detach() != 0).sum()) > 16


def test_etd_student_projection_starts_as_the_kept_hidden_dims():
    from transformers import BertModel

    from fastkd.recipes import Shapes, build_recipe

    shapes = Shapes(4, 2, 32, 16, 4, 4)
    student = BertModel(tiny_bert_config(hidden_size=16, num_hidden_layers=2, intermediate_size=32))
    kept = torch.tensor([1, 4, 5, 7, 9, 11, 12, 13, 17, 20, 22, 25, 26, 28, 30, 31])
    module = distill.DistillModule(student, shapes, build_recipe("tinybert", shapes), kept)
    h_s = torch.randn(3, 16)
    projected = module.fit(h_s)
    assert torch.equal(projected[:, kept], h_s)  # dim j lands on the teacher dim it was extracted from
    dropped = torch.ones(32, dtype=torch.bool)
    dropped[kept] = False
    assert torch.equal(projected[:, dropped], torch.zeros(3, 16))
    # Random init (--etd none) keeps nn.Linear's random projection.
    assert not torch.equal(distill.DistillModule(student, shapes, build_recipe("tinybert", shapes)).fit.bias,
                           torch.zeros(32))


@pytest.mark.parametrize("etd", ["impt", "rand"])
def test_etd_narrower_student_end_to_end(tiny, tmp_path, etd):
    """A student narrower than the teacher (hidden 16 of 32, head dim 4 of 8), extracted by ETD, trains."""
    out = tmp_path / "run"
    argv = args_for(tiny, out, "tinybert", "--etd", etd)
    argv[argv.index("--student-hidden") + 1] = "16"
    res = run_cli(argv)
    assert 0.0 <= res["student_test_acc"] <= 1.0
    assert res["student_params"] < res["teacher_params"]
    steps = [m for m in read_metrics(out) if "loss" in m and "event" not in m]
    assert {m["stage"] for m in steps} == {"intermediate", "prediction"}
