"""fastkd inside the transformers Trainer (fastkd.distill.hf.DistillationTrainer) and plain loops (fastkd.Distiller)."""

from __future__ import annotations

import math

import pytest
import torch

from fastkd.recipes import methods
from tests.train_support import args_for, read_metrics, run_cli

STUDENT = dict(num_layers=2, hidden_size=32, num_heads=4, intermediate_size=64)  # args_for's student


def _pair(tiny, **student):
    """The tiny teacher (with its task head) and a student initialised as ``fastkd.train --etd none`` does."""
    from transformers import AutoTokenizer

    from fastkd.models.encoder import resized_config
    from fastkd.models.teacher import load_model

    teacher = load_model(tiny["teacher"], head=True)
    torch.manual_seed(0)  # --seed 0: make_student seeds right before building the student
    student = type(teacher)(resized_config(teacher.config, **{**STUDENT, **student}))
    return teacher, student, AutoTokenizer.from_pretrained(tiny["teacher"])


def _build(tiny, out, method, args=None, eval_data=True, student=None, **kwargs):
    from transformers import TrainingArguments

    from fastkd.data import load_texts
    from fastkd.distill.hf import DistillationTrainer

    teacher, student, tok = _pair(tiny, **(student or {}))
    settings = dict(per_device_train_batch_size=64, logging_steps=1, report_to="none", save_strategy="no",
                    use_cpu=True, disable_tqdm=True, weight_decay=0.01)
    settings.update(args or {})
    dev = load_texts(str(tiny["data"] / "dev.tsv")) if eval_data else None
    return DistillationTrainer(model=student, teacher_model=teacher, method=method, args=TrainingArguments(
        str(out), **settings), train_dataset=load_texts(str(tiny["data"] / "train.tsv")), eval_dataset=dev,
        processing_class=tok, max_length=24, **kwargs)


def _hf_run(tiny, out, method, **kwargs):
    trainer = _build(tiny, out, method, **kwargs)
    trainer.train()
    return trainer


def _terms(records: list[dict], prefix: str = "") -> list[dict]:
    return [{k[len(prefix) + 5:]: v for k, v in r.items() if k.startswith(prefix + "loss_")} for r in records
            if any(k.startswith(prefix + "loss_") for k in r)]


@pytest.mark.parametrize("method", methods())
def test_trainer_matches_fastkd_train(tiny, tmp_path, method):
    """Same student init, same (whole-data) batches, same optimizer settings: every stage's per-term losses at
    every step equal fastkd.train's to fp32 tolerance; the saved student reloads with no extra keys."""
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification

    extra = ["--general-corpus", str(tiny["data"] / "train.tsv")] if method == "ernie-tiny" else []
    # fp32 on both sides: the HF Trainer trains in fp32 unless its arguments say bf16, and a teacher already on
    # the CPU stays in its dtype there; fastkd.train's CPU default is bf16 where the CPU computes it natively.
    run_cli(args_for(tiny, tmp_path / "cli", method, "--batch-size", "64", "--epochs", "2", "--warmup", "0",
                     "--teacher-dtype", "fp32", "--amp", "off", *extra))
    ours = read_metrics(tmp_path / "cli")
    trainer = _hf_run(tiny, tmp_path / "hf", method, epochs=2)
    stages = trainer.distiller.stages
    assert list(trainer.stage_logs) == [s.name for s in stages]
    for stage in stages:
        want = _terms([r for r in ours if r.get("stage") == stage.name and "event" not in r])
        got = _terms(trainer.stage_logs[stage.name], f"{stage.name}/" if len(stages) > 1 else "")
        assert len(got) == len(want) == 2, (stage.name, got, want)  # one step per epoch
        for g, w in zip(got, want, strict=True):
            assert g.keys() == w.keys()
            for k in w:
                assert math.isclose(g[k], w[k], rel_tol=2e-5, abs_tol=1e-7), (stage.name, k, g[k], w[k])
    trainer.save_model(str(tmp_path / "student"))
    saved = load_file(tmp_path / "student" / "model.safetensors")
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "student")
    assert set(saved) == set(trainer.distiller.student.state_dict())  # no fit.*, emd_w_*, student. prefix
    assert not any(k.startswith(("fit.", "emd_w", "student.")) for k in saved)
    assert (tmp_path / "student" / "tokenizer.json").is_file()
    for k, v in reloaded.state_dict().items():
        assert torch.equal(v, trainer.distiller.student.state_dict()[k]), k


def test_trainer_resume_restores_projection(tiny, tmp_path):
    """A killed two-stage run resumes from its Trainer checkpoint, projection and optimizer included, and ends
    with the weights of the uninterrupted run."""
    from transformers import TrainerCallback

    narrow = {"hidden_size": 16}  # narrower than the teacher: TinyBERT's projection is trained
    full = _hf_run(tiny, tmp_path / "full", "tinybert", epochs=2, args={"save_strategy": "epoch"}, student=narrow)

    class Stop(TrainerCallback):
        def on_save(self, args, state, control, **kw):
            raise KeyboardInterrupt  # killed right after stage 1's first checkpoint

    with pytest.raises(KeyboardInterrupt):
        _hf_run(tiny, tmp_path / "cut", "tinybert", epochs=2, args={"save_strategy": "epoch"},
                callbacks=[Stop()], student=narrow)
    ckpt = tmp_path / "cut" / "stage-1-intermediate" / "checkpoint-1"
    assert (ckpt / "fastkd_distiller.safetensors").is_file()
    resumed = _build(tiny, tmp_path / "cut", "tinybert", epochs=2, args={"save_strategy": "epoch"}, student=narrow)
    with torch.no_grad():
        resumed.distiller.fit.weight.zero_()  # a resume that dropped the projection would keep these zeros
    resumed.train(resume_from_checkpoint=True)
    a, b = full.distiller.state_dict(), resumed.distiller.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-6), k


def test_teacher_is_frozen_unsaved_and_not_trained(tiny, tmp_path):
    trainer = _build(tiny, tmp_path / "o", "kd", epochs=1, args={"save_strategy": "no"})
    teacher = trainer.distiller.teachers["finetuned"]
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    trainer.train()
    assert not any(p.requires_grad for p in teacher.parameters())
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    params = {id(p) for p in trainer.distiller.trainable_parameters()}
    assert not params & {id(p) for p in teacher.parameters()}
    assert not any(k.startswith("teacher") for k in trainer.distiller.state_dict())
    opt_params = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert opt_params == params  # the student and the projection, nothing of the teacher
    pred = trainer.predict(trainer.eval_dataset)  # evaluation runs the student's logits out, not the terms
    assert pred.predictions.shape == (16, 2) and math.isfinite(pred.metrics["test_loss"])


def test_tensorboard_gets_the_per_term_losses(tiny, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _hf_run(tiny, tmp_path / "tb", "tinybert", epochs=1, args={"report_to": "tensorboard"})
    events = sorted((tmp_path / "tb").rglob("events.out.tfevents.*"))
    assert events
    tags = set()
    for e in events:
        acc = EventAccumulator(str(e))
        acc.Reload()
        tags |= set(acc.Tags()["scalars"])
    assert {"train/intermediate/loss_att_mse", "train/intermediate/loss_hidden_mse",
            "train/prediction/loss_soft_ce"} <= tags


def test_distiller_refuses_what_it_cannot_do(tiny):
    from fastkd import Distiller

    teacher, student, _ = _pair(tiny)
    with pytest.raises(ValueError, match="teacher: expected a transformers encoder"):
        Distiller(torch.nn.Linear(2, 2), student, "kd")
    with pytest.raises(ValueError, match="method: expected one of"):
        Distiller(teacher, student, "nope")
    d = Distiller(teacher, student, "tinybert", cache="memory")
    ids = torch.randint(5, 25, (2, 6))
    with pytest.raises(ValueError, match="index: the activation cache"):
        d(input_ids=ids)
    with pytest.raises(ValueError, match="stage: expected one of"):
        d.set_stage("nope")
    from transformers import BertConfig, BertForSequenceClassification

    other = BertForSequenceClassification(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                                                     num_attention_heads=4, intermediate_size=64))
    with pytest.raises(ValueError, match="do not share a tokenizer.*method='kd'"):
        Distiller(teacher, other, "tinybert")
    Distiller(teacher, other, "kd")  # logits only: fine across tokenizers


def test_trainer_refuses_settings_it_would_ignore(tiny, tmp_path):
    with pytest.raises(ValueError, match="label_smoothing_factor"):
        _build(tiny, tmp_path / "a", "kd", args={"label_smoothing_factor": 0.1})
    with pytest.raises(ValueError, match="compute_loss_func"):
        _build(tiny, tmp_path / "b", "kd", compute_loss_func=lambda *a, **k: 0)
    with pytest.raises(ValueError, match="epochs: expected a positive int"):
        _build(tiny, tmp_path / "c", "kd", epochs=0)


def test_distiller_memory_cache_runs_the_teacher_once(tiny):
    from fastkd import Distiller

    teacher, student, _ = _pair(tiny)
    d = Distiller(teacher, student, "minilm", cache="memory")
    ids = torch.randint(5, 25, (3, 7))
    index = torch.arange(3)
    first = d(input_ids=ids, index=index).loss
    second = d({"input_ids": ids, "index": index}).loss  # a batch dict, passed whole
    assert d.runner.calls == 1
    assert torch.allclose(first, second)


def test_tensorboard_across_stages_is_one_run_on_one_step_axis(tiny, tmp_path):
    # Two stages once wrote eval/loss at the same step twice (each stage restarted its count), collided on
    # train/epoch and train/train_loss, and put every stage's events under stage-1-*/runs/.
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "tb"
    _hf_run(tiny, out, "tinybert", epochs=2, args={"report_to": "tensorboard", "eval_strategy": "epoch"})
    folders = {e.parent for e in out.rglob("events.out.tfevents.*")}
    assert len(folders) == 1 and next(iter(folders)).parent == out / "runs", folders
    scalars: dict[str, list] = {}
    for e in sorted(next(iter(folders)).glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(e))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            scalars.setdefault(tag, []).extend((ev.step, ev.value) for ev in acc.Scalars(tag))
    assert not {"eval/loss", "train/epoch", "train/train_loss"} & set(scalars)
    for stage in ("intermediate", "prediction"):
        assert {f"eval/{stage}/loss", f"eval/{stage}/runtime", f"train/{stage}/epoch",
                f"train/{stage}/train_loss"} <= set(scalars), sorted(scalars)
    # 1 step per epoch here: the intermediate stage at steps 1-2, the prediction stage at 3-4
    assert [s for s, _ in scalars["eval/intermediate/loss"]] == [1, 2]
    assert [s for s, _ in scalars["eval/prediction/loss"]] == [3, 4]
    steps = [s for s, _ in scalars["train/intermediate/loss"] + scalars["train/prediction/loss"]]
    assert steps == [1, 2, 3, 4]


def test_training_arguments_set_by_the_user_win_and_the_log_says_so(tiny, tmp_path, caplog):
    import logging

    trainer = _build(tiny, tmp_path / "o", "kd", args={"learning_rate": 1e-3, "num_train_epochs": 1})
    with caplog.at_level(logging.WARNING, logger="fastkd.distill.hf"):
        trainer.train()
    assert trainer.state.global_step == 1  # 48 examples, batch 64: one step in one epoch (the recipe: 3)
    assert "stage 1/1 (kd): 1 epoch(s) (TrainingArguments), learning rate 0.001 (TrainingArguments)" in caplog.text
    lrs = [r["learning_rate"] for r in trainer.state.log_history if "learning_rate" in r]
    assert lrs and max(lrs) <= 1e-3 and max(lrs) > 5e-5  # the user's rate, not the recipe's 5e-5
    # Left at TrainingArguments' defaults, the recipe's values apply, and the log names them.
    caplog.clear()
    two = _build(tiny, tmp_path / "t", "tinybert", args={"num_train_epochs": 1})
    with caplog.at_level(logging.WARNING, logger="fastkd.distill.hf"):
        two.train()
    lr = two.distiller.stages[1].lr
    assert f"stage 2/2 (prediction): 1 epoch(s) (TrainingArguments), learning rate {lr:g} (the tinybert recipe)" \
        in caplog.text
    with pytest.raises(ValueError, match=r"epochs: 2 and args.num_train_epochs=1 disagree"):
        _build(tiny, tmp_path / "x", "kd", args={"num_train_epochs": 1}, epochs=2)


def test_a_teacher_without_a_task_head_is_refused_at_construction(tiny, tmp_path):
    from transformers import AutoModel, TrainingArguments

    from fastkd.data import load_texts
    from fastkd.distill.hf import DistillationTrainer

    _, student, tok = _pair(tiny)
    headless = AutoModel.from_pretrained(tiny["teacher"])
    with pytest.raises(ValueError, match=r"teacher: the finetuned teacher is a BertModel, without a "
                                         r"sequence-classification head, and stage kd of kd reads its logits "
                                         r"\(soft_ce\); fine-tune it on the task first .*python -m fastkd.train"):
        DistillationTrainer(model=student, teacher_model=headless, method="kd",
                            args=TrainingArguments(str(tmp_path / "o"), report_to="none", use_cpu=True),
                            train_dataset=load_texts(str(tiny["data"] / "train.tsv")), processing_class=tok)
