"""Every method on every encoder family through fastkd.Distiller, one optimizer step per stage on tiny random
models (teacher 4 layers, student 2), and every family as the student of a BERT teacher. The combinations a
family cannot give are refused with a ValueError naming the family (hard-coded here, not derived from the
code under test): DeBERTa (v1, v2) and MPNet, whose attention losses read their real score maps, refuse only
BERT-EMD's attention EMD (its cost matrices come from the fused Q/K kernels)."""

from __future__ import annotations

import math

import pytest
import torch

from fastkd import Distiller
from fastkd.recipes import methods
from tests.helpers import FAMILY_TYPES, tiny_family_model

REFUSED = {("deberta", "bert-emd"), ("deberta-v2", "bert-emd"), ("mpnet", "bert-emd")}
SETTINGS = {"minilmv2": {"minilmv2.relation_heads": 4}}
# ModernBERT's local layers attend within ±32 here, more than the batch's 11 tokens: their scores are exact.
CFG = {"modernbert": {"local_attention": 64}}


def _batch():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(5, 32, (3, 11), generator=g)
    mask = torch.ones(3, 11, dtype=torch.long)
    mask[2, 7:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([0, 1, 1])}


def _steps(distiller):
    opt = torch.optim.SGD(distiller.trainable_parameters(), lr=1e-3)
    for stage in distiller.stages:
        distiller.set_stage(stage.name)
        out = distiller(**_batch())
        assert math.isfinite(float(out.loss)) and out.terms, stage.name
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        distiller.after_step()


@pytest.mark.parametrize("model_type", FAMILY_TYPES)
def test_every_method_steps_or_is_refused(model_type):
    cfg = CFG.get(model_type, {})
    teacher = tiny_family_model(model_type, seed=0, layers=4, peaked=False, **cfg)
    student = tiny_family_model(model_type, seed=1, layers=2, peaked=False, **cfg).train()
    for method in methods():
        if (model_type, method) in REFUSED:
            with pytest.raises(ValueError, match=f"is a {model_type} model, and"):
                Distiller(teacher, student, method, settings=SETTINGS.get(method))
            continue
        _steps(Distiller(teacher, student, method, settings=SETTINGS.get(method)))


@pytest.mark.parametrize("model_type", FAMILY_TYPES)
def test_every_family_as_the_student_of_a_bert_teacher(model_type):
    teacher = tiny_family_model("bert", seed=0, layers=4, peaked=False)
    student = tiny_family_model(model_type, seed=1, layers=2, peaked=False, **CFG.get(model_type, {})).train()
    method = "tinybert"
    _steps(Distiller(teacher, student, method, settings=SETTINGS.get(method)))


def test_real_score_maps_are_never_cached():
    teacher = tiny_family_model("deberta-v2", seed=0, layers=4, peaked=False)
    student = tiny_family_model("bert", seed=1, layers=2, peaked=False)
    with pytest.raises(ValueError, match=r"real \[B, H, L, L\] attention scores, which the activation cache does "
                                         r"not hold; use cache='off'"):
        Distiller(teacher, student, "tinybert", cache="memory")
    relations = Distiller(teacher, student, "minilmv2", cache="memory", settings=SETTINGS["minilmv2"])
    assert relations.runner.cache is not None  # Q/K/V relations cache as usual


def test_logit_kd_across_tokenizers_through_the_api():
    # Different vocabularies: token-level terms are refused; logit KD works when each model reads its own
    # tokenisation and the caller hands the teacher's logits over (what fastkd.train's refusal points to).
    teacher = tiny_family_model("bert", seed=0, layers=4, peaked=False)
    student = tiny_family_model("distilbert", seed=1, layers=2, peaked=False, vocab_size=40).train()
    with pytest.raises(ValueError, match=r"its vocabulary has 40 tokens and the teacher's 32.*method='kd'"):
        Distiller(teacher, student, "tinybert")
    distiller = Distiller(teacher, student, "kd")
    t_batch, labels = _batch(), torch.tensor([0, 1, 1])
    s_ids = torch.randint(5, 40, (3, 9))  # the student's own tokenisation of the same three texts
    with torch.no_grad():
        t_logits = teacher(input_ids=t_batch["input_ids"], attention_mask=t_batch["attention_mask"]).logits
    out = distiller(input_ids=s_ids, attention_mask=torch.ones_like(s_ids), labels=labels,
                    teacher_outputs={"logits": t_logits})
    out.loss.backward()
    assert set(out.terms) == {"soft_ce", "hard_ce"} and math.isfinite(float(out.loss))
    assert student.distilbert.embeddings.word_embeddings.weight.grad is not None
