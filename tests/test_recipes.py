"""Recipes: paper mappings and defaults, overrides, capture plans, clear mapping errors (pure Python, instant)."""

from __future__ import annotations

import pytest

from fastkd.recipes import (
    MappingError,
    Shapes,
    build_recipe,
    load_config_file,
    make_params,
    methods,
    parse_set,
    uniform_pairs,
)
from fastkd.terms import capture_plan, plan_fields

BASE = Shapes(teacher_layers=12, student_layers=4, teacher_hidden=768, student_hidden=312, teacher_heads=12,
              student_heads=12)
SAME_WIDTH = Shapes(12, 6, 768, 768, 12, 12)


def kinds(stage):
    return {t.kind: t for t in stage.terms}


def test_uniform_mapping_tinybert():
    # TinyBERT: student layer i <- teacher layer k*(i+1) - 1 (k = 3 for 12 -> 4), last layers meet.
    assert uniform_pairs(4, 12) == [(0, 2), (1, 5), (2, 8), (3, 11)]
    assert uniform_pairs(3, 6) == [(0, 1), (1, 3), (2, 5)]
    assert uniform_pairs(4, 6)[-1] == (3, 5)  # not a multiple: rounded, still ends on the last layer


def test_tinybert_two_stages_paper_defaults():
    r = build_recipe("tinybert", BASE)
    assert [s.name for s in r.stages] == ["intermediate", "prediction"]
    inter, pred = r.stages
    assert set(kinds(inter)) == {"emb_mse", "hidden_mse", "att_mse"}
    assert kinds(inter)["att_mse"].pairs == [(0, 2), (1, 5), (2, 8), (3, 11)]
    assert (inter.epochs, inter.lr, pred.epochs, pred.lr) == (10, 5e-5, 3, 3e-5)
    soft = kinds(pred)["soft_ce"]
    assert soft.temperature == 1.0 and not soft.times_t2  # TinyBERT: T = 1, no T²
    assert not inter.trains_head and pred.trains_head


def test_pkd_layers_from_the_paper():
    skip = build_recipe("pkd-skip", SAME_WIDTH)  # 12 -> 6: teacher layers 1, 3, 5, 7, 9
    assert [t for _, t in kinds(skip.stages[0])["pkd"].pairs] == [1, 3, 5, 7, 9]
    last = build_recipe("pkd-last", Shapes(12, 3, 768, 768, 12, 12))  # 12 -> 3: teacher layers 9, 10
    assert kinds(last.stages[0])["pkd"].pairs == [(0, 9), (1, 10)]
    k = kinds(skip.stages[0])
    # β = 500 applies to PKD's mean over (layers, batch, features); pkd_mse sums features and layers.
    assert (k["soft_ce"].weight, k["hard_ce"].weight) == (0.7, pytest.approx(0.3))
    assert k["pkd"].weight == pytest.approx(500.0 / (5 * SAME_WIDTH.student_hidden))
    assert k["soft_ce"].temperature == 10.0 and k["soft_ce"].times_t2


def test_minilm_and_minilmv2():
    m = build_recipe("minilm", BASE)
    assert kinds(m.stages[0])["att_kl"].pairs == [(3, 11)]  # last layer to last layer
    assert [s.name for s in m.stages] == ["distill", "finetune"]
    v2 = build_recipe("minilmv2", Shapes(24, 6, 1024, 384, 16, 12), make_params("minilmv2", {
        "minilmv2.teacher_layer": 20}))
    term = kinds(v2.stages[0])["qkv_relation"]
    assert term.pairs == [(5, 20)] and term.relation_heads == 64  # large teacher: 64 relation heads
    assert kinds(build_recipe("minilmv2", BASE).stages[0])["qkv_relation"].relation_heads == 12  # 312 % 48 != 0
    assert kinds(build_recipe("minilmv2", Shapes(12, 6, 768, 384, 12, 12)).stages[0])[
        "qkv_relation"].relation_heads == 48
    # head counts may differ for v2 but not for v1
    with pytest.raises(MappingError, match="same head count"):
        build_recipe("minilm", Shapes(12, 4, 768, 384, 12, 6))
    build_recipe("minilmv2", Shapes(12, 4, 768, 384, 12, 6))


def test_bert_emd_and_ernie_tiny_structure():
    emd = build_recipe("bert-emd", BASE)
    k = kinds(emd.stages[0])
    assert {"emd_att", "emd_hidden", "emb_mse", "soft_ce", "hard_ce"} == set(k)
    assert k["soft_ce"].weight == 0.8 and k["hard_ce"].weight == 0.2
    ernie = build_recipe("ernie-tiny", BASE)
    assert [(s.name, s.teacher, s.data) for s in ernie.stages] == [
        ("general", "pretrained", "general"), ("general-enhanced", "finetuned", "general"),
        ("task-adaptive", "finetuned", "task"), ("task-specific", "finetuned", "task")]
    assert "hard_ce" in kinds(ernie.stages[3]) and "soft_ce" in kinds(ernie.stages[3])
    assert not any(t.kind in ("soft_ce", "hard_ce") for s in ernie.stages[:3] for t in s.terms)


def test_general_mode_keeps_latent_losses_only():
    r = build_recipe("tinybert", BASE, mode="general")
    assert [s.name for s in r.stages] == ["intermediate"]
    assert r.stages[0].data == "general" and r.stages[0].teacher == "pretrained"
    e = build_recipe("bert-emd", BASE, mode="general")
    assert set(kinds(e.stages[0])) == {"emd_att", "emd_hidden", "emb_mse"}
    with pytest.raises(ValueError, match="can't run with --mode general"):
        build_recipe("kd", SAME_WIDTH, mode="general")
    assert set(kinds(build_recipe("pkd-skip", SAME_WIDTH, mode="general").stages[0])) == {"pkd"}


def test_overrides_and_coercion():
    p = make_params("tinybert", {"tinybert.att_weight": "2", "tinybert.layer_map": "0:1,1:3,2:5,3:11",
                                 "pkd.beta": 3})
    assert p.att_weight == 2.0 and isinstance(p.att_weight, float)
    r = build_recipe("tinybert", BASE, p)
    assert kinds(r.stages[0])["att_mse"].weight == 2.0
    assert kinds(r.stages[0])["hidden_mse"].pairs == [(0, 1), (1, 3), (2, 5), (3, 11)]
    assert make_params("pkd-last", {"pkd": {"beta": 100}}).beta == 100.0
    with pytest.raises(ValueError, match="has no setting 'nope'"):
        make_params("kd", {"kd.nope": 1})
    with pytest.raises(ValueError, match="expected int"):
        make_params("tinybert", {"tinybert.inter_epochs": "1.5"})
    with pytest.raises(ValueError, match="unknown method prefix"):
        make_params("kd", {"bogus.x": 1})
    with pytest.raises(ValueError, match="<method>.<field>=<value>"):
        parse_set(["tinybert.att_weight"])
    # a zero weight switches a term off
    r = build_recipe("tinybert", BASE, make_params("tinybert", {"tinybert.emb_weight": 0}))
    assert "emb_mse" not in kinds(r.stages[0])


@pytest.mark.parametrize("key,value,expected", [
    ("kd.alpha", 2, r"--set kd.alpha: expected a number in \[0, 1\], got 2.0"),
    ("kd.temperature", 0, "--set kd.temperature: expected a finite number > 0, got 0.0"),
    ("tinybert.pred_lr", -1e-5, "--set tinybert.pred_lr: expected a finite number > 0"),
    ("tinybert.inter_epochs", -1, "--set tinybert.inter_epochs: expected an epoch count >= 0"),
    ("pkd.beta", -500, "--set pkd.beta: expected a finite number >= 0"),
    ("emd.sinkhorn_eps", 0, "--set bert-emd.sinkhorn_eps: expected a finite number > 0"),
    ("minilmv2.relation_heads", 0, "--set minilmv2.relation_heads: expected a positive integer"),
    ("ernie.soft_weight", float("inf"), "--set ernie-tiny.soft_weight: expected a finite number >= 0"),
])
def test_override_out_of_range_names_the_setting(key, value, expected):
    method = {"kd": "kd", "tinybert": "tinybert", "pkd": "pkd-skip", "emd": "bert-emd", "minilmv2": "minilmv2",
              "ernie": "ernie-tiny"}[key.split(".")[0]]
    with pytest.raises(ValueError, match=expected):
        make_params(method, {key: value})


def test_override_edge_values_that_mean_something_are_accepted():
    p = make_params("tinybert", {"tinybert.inter_epochs": 0, "tinybert.att_weight": 0})  # skip a stage, drop a term
    assert p.inter_epochs == 0 and p.att_weight == 0.0
    assert make_params("kd", {"kd.alpha": 1}).alpha == 1.0
    assert make_params("minilm", {"minilm.teacher_layer": -2}).teacher_layer == -2


def test_cpu_cap_applies_to_the_recipes_epochs_not_to_the_ones_a_user_sets():
    # The trainer's CPU profile caps the recipe's own epochs; TinyBERT's 10 intermediate epochs, asked for with
    # --set, are the user's.
    p = make_params("tinybert", {"tinybert.inter_epochs": 10}, max_epochs=1)
    assert (p.inter_epochs, p.pred_epochs) == (10, 1)
    assert [s.epochs for s in build_recipe("tinybert", BASE, p).stages] == [10, 1]
    p = make_params("tinybert", {"tinybert": {"pred_epochs": 3}}, max_epochs=2)
    assert (p.inter_epochs, p.pred_epochs) == (2, 3)
    assert make_params("bert-emd", {"kd.epochs": 7}, max_epochs=1).epochs == 1  # another method's setting
    assert make_params("bert-emd", {}).epochs == 4  # no cap: the recipe's own
    assert [s.epochs for s in build_recipe("tinybert", BASE, p, epochs=5).stages] == [5, 5]  # --epochs: every stage


def test_config_file_json_and_yaml(tmp_path):
    j = tmp_path / "c.json"
    j.write_text('{"tinybert": {"att_weight": 4}}')
    assert make_params("tinybert", load_config_file(j)).att_weight == 4.0
    y = tmp_path / "c.yml"
    y.write_text("bert-emd.beta: 0.002\n")
    assert make_params("bert-emd", load_config_file(y)).beta == 0.002
    with pytest.raises(ValueError, match="no such file"):
        load_config_file(tmp_path / "missing.json")


@pytest.mark.parametrize("method", methods())
def test_every_method_builds_and_validates(method):
    shapes = SAME_WIDTH if method.startswith("pkd") else BASE
    r = build_recipe(method, shapes)
    assert r.stages and all(s.terms for s in r.stages)
    with pytest.raises(MappingError, match="--student-layers to at most 12"):
        build_recipe(method, Shapes(12, 13, 768, 768, 12, 12))


def test_mapping_errors_say_what_to_change():
    with pytest.raises(MappingError, match="--student-hidden 768"):
        build_recipe("pkd-skip", BASE, make_params("pkd-skip", {"pkd.project_width": "false"}))
    with pytest.raises(MappingError, match="--student-heads 12"):
        build_recipe("tinybert", Shapes(12, 4, 768, 312, 12, 4))
    with pytest.raises(MappingError, match="relation_heads=7 must divide"):
        build_recipe("minilmv2", BASE, make_params("minilmv2", {"minilmv2.relation_heads": 7}))
    with pytest.raises(MappingError, match="teacher layer 12 out of range"):
        build_recipe("tinybert", BASE, make_params("tinybert", {"tinybert.layer_map": "0:12"}))
    with pytest.raises(MappingError, match="not divisible"):
        build_recipe("kd", Shapes(12, 4, 768, 310, 12, 12))
    with pytest.raises(ValueError, match="method: expected one of"):
        build_recipe("distil", BASE)


def test_capture_plan_records_only_what_terms_read():
    r = build_recipe("tinybert", BASE)
    t = capture_plan(r.stages[0].terms, "teacher")
    assert t["embeddings"] and t["hidden"] == {2, 5, 8, 11} and t["scores"] == {2, 5, 8, 11} and not t["qkv"]
    assert not t["logits"]
    # Attention scores become Q and K for a q·kᵀ family, or the model's own score maps (DeBERTa, MPNet).
    assert plan_fields(t, 12) == ["emb"] + [f"hidden.{i}" for i in (2, 5, 8, 11)] + [
        f"{c}.{i}" for i in (2, 5, 8, 11) for c in "kq"]
    assert plan_fields(t, 12, real_scores=True)[-4:] == [f"scores.{i}" for i in (2, 5, 8, 11)]
    s = capture_plan(r.stages[0].terms, "student")
    assert s["hidden"] == {0, 1, 2, 3}
    p = capture_plan(r.stages[1].terms, "teacher")
    assert p["logits"] and not p["hidden"] and not p["qkv"] and not p["embeddings"]
    v2 = capture_plan(build_recipe("minilmv2", BASE).stages[0].terms, "teacher")
    assert v2["qkv"] == {11: "kqv"} and not v2["hidden"]
    emd = capture_plan(build_recipe("bert-emd", BASE).stages[0].terms, "teacher")
    assert emd["all_hidden"] and emd["all_qk"]


def test_etd_extracts_the_teacher_layers_each_recipe_distils_against():
    from fastkd.student.make import mapped_teacher_layers

    shapes = Shapes(6, 3, 384, 384, 12, 12)
    assert mapped_teacher_layers(build_recipe("tinybert", shapes), 3, 6) == [1, 3, 5]
    # PKD-Last compares students 0, 1 with teacher 3, 4; the last student layer feeds the logits (teacher 5).
    assert mapped_teacher_layers(build_recipe("pkd-last", shapes), 3, 6) == [3, 4, 5]
    assert mapped_teacher_layers(build_recipe("pkd-skip", shapes), 3, 6) == [1, 3, 5]
    assert mapped_teacher_layers(build_recipe("kd", shapes), 3, 6) is None
