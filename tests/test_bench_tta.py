"""bench/time_to_accuracy.py's own logic (the contestants themselves run in the benchmark): when a trace first
reaches each share of the teacher, what a TextBrewer user's copied student holds."""

from __future__ import annotations

import copy

import pytest
import torch

from bench.time_to_accuracy import copied_student, summarize
from tests.helpers import tiny_bert_config


def _eval(step, train_s, acc):
    return {"step": step, "stage": "s", "train_s": train_s, "dev_acc": acc, "eval_s": 0.5}


def test_summarize_times_the_first_evaluation_past_each_target():
    trace = {"evals": [_eval(10, 5.0, 0.80), _eval(20, 10.0, 0.86), _eval(30, 15.0, 0.89), _eval(40, 20.0, 0.85)],
             "stages": [{"name": "a", "samples": 640, "train_s": 8.0}, {"name": "b", "samples": 320, "train_s": 12.0}],
             "peak_rss_mib": 100.0, "wall_s": 30.0}
    s = summarize(trace, teacher_acc=0.9, budget_s=10.0)
    assert (s["time_to_95pct_s"], s["steps_to_95pct"]) == (10.0, 20)  # 0.855 first met at step 20
    assert (s["time_to_97pct_s"], s["steps_to_97pct"]) == (15.0, 30)  # 0.873
    assert s["best_within_budget"] == 0.86 and s["best_dev_acc"] == 0.89 and s["final_dev_acc"] == 0.85
    assert s["samples_per_s"] == pytest.approx(960 / 20.0) and s["eval_s"] == 2.0
    assert [x["samples_per_s"] for x in s["stages"]] == pytest.approx([80.0, 320 / 12.0])
    never = summarize({**trace, "evals": [_eval(10, 5.0, 0.5)]}, teacher_acc=0.9, budget_s=None)
    assert never["time_to_95pct_s"] is None and "best_within_budget" not in never


def test_copied_student_takes_the_mapped_teacher_layers_where_widths_match():
    from transformers import BertForSequenceClassification

    torch.manual_seed(0)
    teacher = BertForSequenceClassification(tiny_bert_config())
    small = copy.deepcopy(teacher.config)
    small.num_hidden_layers = 2
    student = copied_student(teacher, small, [(0, 1), (1, 3)], seed=0)
    s, t = student.state_dict(), teacher.state_dict()
    for i, j in [(0, 1), (1, 3)]:
        key = "bert.encoder.layer.{}.attention.self.query.weight"
        assert torch.equal(s[key.format(i)], t[key.format(j)])
    for key in ("bert.embeddings.word_embeddings.weight", "classifier.weight", "bert.pooler.dense.weight"):
        assert torch.equal(s[key], t[key])
    narrow = copy.deepcopy(small)
    narrow.hidden_size, narrow.intermediate_size = 16, 32
    random = copied_student(teacher, narrow, [(0, 1), (1, 3)], seed=0).state_dict()
    assert random["bert.embeddings.word_embeddings.weight"].shape[1] == 16  # nothing to copy: random init
