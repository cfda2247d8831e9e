"""fastkd.train end to end on tiny teachers of other encoder families (built offline, tests/helpers.py), and the
refusals that name the family: the parity of what these runs capture is tests/test_families.py's."""

from __future__ import annotations

import math

import pytest

from fastkd import train
from tests.helpers import make_family_teacher, write_task
from tests.train_support import args_for, one_thread, read_metrics, run_cli  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_task(tmp_path_factory.mktemp("family-data"))


def _tiny(tmp_path, data, model_type, **cfg):
    return {"teacher": make_family_teacher(tmp_path / model_type, model_type, **cfg), "data": data}


@pytest.mark.parametrize("model_type, method", [
    ("distilbert", "tinybert"),
    ("modernbert", "tinybert"),  # local layers' window (±32) covers --max-length 24: their scores are exact
    ("deberta-v2", "tinybert"),  # the real-score path: DeBERTa's own scores, materialised
    ("mpnet", "minilm"),  # likewise, with MPNet's relative-position bias
    ("deberta", "tinybert"),  # DeBERTa v1: its interleaved in_proj split as the model does, its real scores
    ("albert", "kd"),
    ("albert", "tinybert"),  # its one shared layer captured per depth
    ("megatron-bert", "minilm"),  # eager attention (it has no SDPA path), set by fastkd
])
def test_method_runs_end_to_end(tmp_path, data, model_type, method):
    cfg = {"local_attention": 64} if model_type == "modernbert" else {}
    tiny = _tiny(tmp_path, data, model_type, **cfg)
    out = tmp_path / "out"
    res = run_cli(args_for(tiny, out, method, "--etd", "none"))
    recipe = res["trainer"].recipe
    steps = [m for m in read_metrics(out) if "loss" in m and "event" not in m]
    for stage in recipe.stages:  # every stage logged every term, all finite
        mine = [m for m in steps if m["stage"] == stage.name]
        assert mine and all(math.isfinite(m[f"loss_{t.kind}"]) for m in mine for t in stage.terms), stage.name
    assert 0.0 <= res["student_test_acc"] <= 1.0
    if model_type != "albert":  # ALBERT's layers share one set of weights: fewer layers, same parameters
        assert res["student_params"] < res["teacher_params"]
    from transformers import AutoModelForSequenceClassification

    student = AutoModelForSequenceClassification.from_pretrained(out / "student")
    assert student.config.model_type == model_type and student.config.num_hidden_layers == 2


def test_deberta_runs_tinybert_on_its_real_scores_and_says_so(tmp_path, data):
    tiny = _tiny(tmp_path, data, "deberta-v2")
    lines = []
    cfg = train.parse_config(args_for(tiny, tmp_path / "out", "tinybert", "--etd", "none", "--cache", "auto"))
    train.run(cfg, log=lines.append)
    log = "\n".join(map(str, lines))
    assert "the teacher (deberta-v2) and the student (deberta-v2) attend with more than q·kᵀ/√d" in log
    assert "reference path, not the fused kernels" in log
    assert "teacher: deberta-v2 runs eager attention (fastkd loads it so: transformers has no SDPA path" in log
    assert "teacher cache: off for stage intermediate: it reads the teacher's real [B, H, L, L] attention" in log


def test_bert_emd_attention_is_refused_for_deberta(tmp_path, data):
    tiny = _tiny(tmp_path, data, "deberta-v2")
    with pytest.raises(ValueError, match=r"emd_att \(stage emd of bert-emd\): the (student|teacher) is a "
                                         r"deberta-v2 model, and its real attention scores are not q·kᵀ/√d"):
        run_cli(args_for(tiny, tmp_path / "out", "bert-emd", "--etd", "none"))


def test_modernbert_window_shorter_than_the_batch_is_refused(tmp_path, data):
    tiny = _tiny(tmp_path, data, "modernbert")  # local_attention 16: ±8 tokens, batches here reach 15
    with pytest.raises(ValueError, match=r"att_mse \((teacher|student)\): modernbert layers \[1\] attend within a "
                                         r"sliding window of ±8 tokens"):
        run_cli(args_for(tiny, tmp_path / "out", "tinybert", "--etd", "none"))


def test_etd_refuses_a_family_it_cannot_cut(tmp_path, data):
    tiny = _tiny(tmp_path, data, "mobilebert")
    with pytest.raises(ValueError, match="not for a mobilebert model: its bottleneck and stacked-FFN widths .* Use "
                                         "--etd none"):
        run_cli(args_for(tiny, tmp_path / "out", "kd", "--etd", "rand"))


def test_etd_extracts_a_modernbert_student(tmp_path, data):
    # Wqkv cut by thirds, both GeGLU halves of Wi together, the head dim (8) kept for the rotary step, and each
    # kept layer keeps its global/local type.
    tiny = _tiny(tmp_path, data, "modernbert", layers=4, local_attention=64)
    out = tmp_path / "out"
    run_cli(args_for(tiny, out, "tinybert", "--etd", "impt", "--student-hidden", "32", "--student-heads", "4",
                     "--student-ffn", "40", "--set", "tinybert.layer_map=0:0,1:2"))
    from transformers import AutoModelForSequenceClassification

    student = AutoModelForSequenceClassification.from_pretrained(out / "student")
    assert (student.config.num_hidden_layers, student.config.intermediate_size) == (2, 40)
    assert student.config.layer_types == ["full_attention", "full_attention"]


def test_etd_extracts_a_distilbert_student(tmp_path, data):
    tiny = _tiny(tmp_path, data, "distilbert", layers=4)
    out = tmp_path / "out"
    run_cli(args_for(tiny, out, "tinybert", "--etd", "impt", "--student-hidden", "24", "--student-heads", "4",
                     "--student-ffn", "48"))
    from transformers import AutoModelForSequenceClassification

    student = AutoModelForSequenceClassification.from_pretrained(out / "student")
    assert (student.config.model_type, student.config.dim, student.config.hidden_dim) == ("distilbert", 24, 48)


@pytest.mark.parametrize("model_type", ["distilbert", "roberta"])
def test_pretrained_student_of_another_family_with_the_packaged_teacher(tmp_path, data, model_type):
    # The packaged MiniLM (BERT, 6 x 384, 12 heads) teaching a tiny random student of another family that reads
    # the same tokenizer: 2 layers x 96 (12 heads of 8), so TinyBERT's hidden terms go through its projection.
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from fastkd.models.teacher import default_teacher_path
    from tests.helpers import tiny_family_model

    tok = AutoTokenizer.from_pretrained(default_teacher_path())
    student_dir = tmp_path / f"student-{model_type}"
    tiny_family_model(model_type, layers=2, hidden=96, heads=12, ffn=128, vocab_size=len(tok),
                      peaked=False).save_pretrained(student_dir)
    tok.save_pretrained(student_dir)
    tiny = {"teacher": default_teacher_path(), "data": data}
    out = tmp_path / "out"
    res = run_cli(args_for(tiny, out, "tinybert", "--student", str(student_dir), "--finetune-epochs", "1"))
    steps = [m for m in read_metrics(out) if "loss" in m and "event" not in m]
    assert {m["stage"] for m in steps} == {"intermediate", "prediction"}
    assert all(math.isfinite(m["loss"]) for m in steps) and "loss_hidden_mse" in steps[0]
    saved = AutoModelForSequenceClassification.from_pretrained(out / "student")
    assert saved.config.model_type == model_type and saved.config.hidden_size == 96
    assert res["student_params"] < res["teacher_params"]


def test_student_with_another_tokenizer_trains_by_logit_kd_only(tmp_path, data):
    # The packaged MiniLM (30,522 WordPiece tokens) and a DistilBERT student with its own 25-token tokenizer:
    # token-level terms are refused before training; logit KD runs, each model reading its own tokenisation.
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from fastkd.models.teacher import default_teacher_path

    student_dir = make_family_teacher(tmp_path / "student", "distilbert", hidden=48, heads=12)
    tiny = {"teacher": default_teacher_path(), "data": data}
    with pytest.raises(ValueError, match=r"--student: .* reads a different vocabulary from the teacher's tokenizer "
                                         r"\(its own tokenizer differs\), so the token-level terms \['att_mse', "
                                         r"'emb_mse', 'hidden_mse'\] of tinybert .* or --method kd"):
        run_cli(args_for(tiny, tmp_path / "tb", "tinybert", "--student", str(student_dir)))
    out = tmp_path / "kd"
    res = run_cli(args_for(tiny, out, "kd", "--student", str(student_dir), "--finetune-epochs", "1"))
    steps = [m for m in read_metrics(out) if "loss" in m and "event" not in m]
    assert steps and all(math.isfinite(m["loss_soft_ce"]) for m in steps)
    assert 0.0 <= res["student_test_acc"] <= 1.0 and 0.0 <= res["teacher_test_acc"] <= 1.0
    # The student is saved with its own tokenizer, and it reads it: ids within its 32-token vocabulary.
    tok = AutoTokenizer.from_pretrained(out / "student")
    assert len(tok) == len(AutoTokenizer.from_pretrained(student_dir)) != len(AutoTokenizer.from_pretrained(
        default_teacher_path()))
    assert max(res["trainer"].student_tokens.splits["task"][0]["input_ids"]) < 32
    AutoModelForSequenceClassification.from_pretrained(out / "student")
    # Augmented data too: the student's tokenisation covers the copies (rows past the task data's), by index.
    aug = run_cli(args_for(tiny, tmp_path / "kd-aug", "kd", "--student", str(student_dir), "--finetune-epochs", "1",
                           "--augment", "all-stages", "--augment-copies", "2"))
    data = aug["trainer"].data
    assert len(aug["trainer"].student_tokens.splits["task"]) == len(data["augmented"]) > len(data["task"])
    assert all(math.isfinite(m["loss_soft_ce"]) for m in read_metrics(tmp_path / "kd-aug")
               if "loss" in m and "event" not in m)


def test_student_and_etd_together_are_refused(tmp_path, data):
    student_dir = make_family_teacher(tmp_path / "student", "distilbert")
    tiny = _tiny(tmp_path, data, "bert")
    with pytest.raises(ValueError, match="--etd: rand extracts a student from the teacher, and --student gives one"):
        run_cli(args_for(tiny, tmp_path / "out", "tinybert", "--student", str(student_dir), "--etd", "rand"))


def test_family_refusal_comes_before_the_teacher_is_fine_tuned(tmp_path, data):
    from tests.helpers import tiny_family_model, write_tokenizer

    folder = tmp_path / "deberta-headless"  # no task head: a run would fine-tune it first
    tiny_family_model("deberta", peaked=False).base_model.save_pretrained(folder)
    write_tokenizer(folder)
    lines = []
    cfg = train.parse_config(args_for({"teacher": folder, "data": data}, tmp_path / "out", "bert-emd"))
    with pytest.raises(ValueError, match=r"emd_att \(stage emd of bert-emd\): the (student|teacher) is a deberta "
                                         r"model, and its real attention scores are not q·kᵀ/√d"):
        train.run(cfg, log=lines.append)
    assert not any("fine-tun" in str(x) for x in lines)


def test_kd_runs_for_a_teacher_of_no_listed_family(tmp_path, data):
    # ConvBERT is not a registered family: logit KD needs no capture, so it runs (here with a BERT --student);
    # a method that reads activations is refused naming the model_type and the supported families.
    from transformers import ConvBertConfig, ConvBertForSequenceClassification

    from tests.helpers import write_tokenizer

    teacher_dir = tmp_path / "convbert"
    cfg = ConvBertConfig(vocab_size=32, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=64, embedding_size=32, max_position_embeddings=64, num_labels=2)
    ConvBertForSequenceClassification(cfg).save_pretrained(teacher_dir)
    write_tokenizer(teacher_dir)
    student_dir = make_family_teacher(tmp_path / "student", "bert", layers=2)
    tiny = {"teacher": teacher_dir, "data": data}
    res = run_cli(args_for(tiny, tmp_path / "kd", "kd", "--student", str(student_dir)))
    assert 0.0 <= res["student_test_acc"] <= 1.0
    with pytest.raises(ValueError, match="teacher: model_type 'convbert' is not a supported encoder family"):
        run_cli(args_for(tiny, tmp_path / "tb", "tinybert", "--student", str(student_dir)))
