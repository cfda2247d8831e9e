"""Data sources beyond TSV files: Parquet (files, folders, hub-style shards), save_to_disk folders, Dataset and
DatasetDict objects, hub names (refused clearly offline) and regression labels."""

from __future__ import annotations

import json
import math

import pytest

from fastkd import data
from tests.train_support import args_for, read_metrics, run_cli


def _splits(tiny):
    import datasets

    return datasets.DatasetDict({"train": data.load_texts(str(tiny["data"] / "train.tsv")),
                                 "validation": data.load_texts(str(tiny["data"] / "dev.tsv")),
                                 "test": data.load_texts(str(tiny["data"] / "test.tsv"))})


def _without_data_flags(argv: list[str]) -> list[str]:
    out = list(argv)
    for flag in ("--dev", "--test"):
        i = out.index(flag)
        del out[i:i + 2]
    return out


def _trained(out) -> dict:
    recs = read_metrics(out)
    final = next(r for r in recs if r.get("event") == "final")
    assert any("loss_hard_ce" in r for r in recs)
    return final


def test_parquet_files_train(tiny, tmp_path):
    """A .parquet file was read as text (UnicodeDecodeError); now each split is one Parquet file."""
    dd = _splits(tiny)
    for split, ds in dd.items():
        ds.to_parquet(str(tmp_path / f"{split}.parquet"))
    argv = args_for(tiny, tmp_path / "out", "kd")
    for flag, split in (("--task", "train"), ("--dev", "validation"), ("--test", "test")):
        argv[argv.index(flag) + 1] = str(tmp_path / f"{split}.parquet")
    run_cli(argv)
    final = _trained(tmp_path / "out")
    assert final["test_examples"] == 16
    back = data.load_texts(str(tmp_path / "train.parquet"))
    assert data.label_names(back) == data.label_names(dd["train"])  # the ClassLabel names survive Parquet
    assert back["label"] == dd["train"]["label"] and back["text"] == dd["train"]["text"]


def test_parquet_shards_in_a_hub_style_folder(tiny, tmp_path):
    dd = _splits(tiny)
    (tmp_path / "repo" / "data").mkdir(parents=True)
    for split, ds in dd.items():
        ds.to_parquet(str(tmp_path / "repo" / "data" / f"{split}-00000-of-00001.parquet"))
    assert data.has_splits(str(tmp_path / "repo"))
    dev = data.load_texts(str(tmp_path / "repo"), "dev")  # dev is the validation split
    assert dev["text"] == dd["validation"]["text"]
    run_cli(_without_data_flags(args_for(tiny, tmp_path / "out", "kd", "--task", str(tmp_path / "repo"))))
    assert _trained(tmp_path / "out")["test_examples"] == 16


def test_save_to_disk_folders(tiny, tmp_path):
    dd = _splits(tiny)
    dd.save_to_disk(str(tmp_path / "saved"))
    argv = _without_data_flags(args_for(tiny, tmp_path / "out", "kd", "--task", str(tmp_path / "saved")))
    run_cli(argv)
    assert _trained(tmp_path / "out")["test_examples"] == 16
    dd["train"].save_to_disk(str(tmp_path / "one"))  # a single Dataset: one split, dev held out of train
    assert not data.has_splits(str(tmp_path / "one"))
    assert data.load_texts(str(tmp_path / "one"))["label"] == dd["train"]["label"]


def test_datasetdict_in_code(tiny, tmp_path):
    from fastkd import train

    dd = _splits(tiny)
    argv = _without_data_flags(args_for(tiny, tmp_path / "out", "kd"))
    cfg = train.parse_config(argv)
    res = train.run(cfg, log=lambda *_: None, data=dd)
    assert res["test_examples"] == 16
    # The run's identity names the data by fingerprint, in the trainer's own copy: the caller's config is unchanged.
    assert res["trainer"].cfg.task.startswith("datasetdict-") and not cfg.task.startswith("datasetdict-")
    assert json.loads((tmp_path / "out" / "run.json").read_text())["identity"]["task"].startswith("datasetdict-")
    with pytest.raises(ValueError, match="data: expected a datasets.Dataset or DatasetDict"):
        train.run(train.parse_config(argv), data={"train": []})


def test_hub_name_offline_fails_clearly(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    assert data.is_hub_name("stanfordnlp/sst2") and not data.is_hub_name(str(tmp_path / "nope.tsv"))
    with pytest.raises(FileNotFoundError, match=r"'stanfordnlp/sst2'.*HF_DATASETS_OFFLINE"):
        data.load_texts("stanfordnlp/sst2")
    argv = _without_data_flags(args_for(tiny, tmp_path / "out", "kd", "--task", "stanfordnlp/sst2"))
    with pytest.raises(FileNotFoundError, match=r"'stanfordnlp/sst2'.*HF_DATASETS_OFFLINE"):
        run_cli(argv)
    assert not (tmp_path / "out" / "metrics.jsonl").exists()


def _regression_file(tmp_path, name="sts.tsv", n=24, seed=0):
    import random

    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        k = rng.randint(1, 5)
        words = " ".join(rng.choice(["good", "fine", "bad"]) for _ in range(k))
        rows.append(f"{words}\t{k + 0.25 * rng.randint(0, 3)}")
    (tmp_path / name).write_text("\n".join(["sentence\tscore", *rows]) + "\n")
    return tmp_path / name


def test_float_labels_are_regression_not_classes(tmp_path):
    """Real-number labels once trained silently as one class per distinct value (dev accuracy 0)."""
    ds = data.load_texts(str(_regression_file(tmp_path)))
    assert data.is_regression(ds) and ds.features["label"].dtype == "float32"
    assert all(x != int(x) for x in ds["label"] if x % 1)  # kept as written, fractions and all
    (tmp_path / "bad.tsv").write_text("sentence\tscore\na\t0.5\nb\tnan\n")
    with pytest.raises(ValueError, match="NaN/inf label.*rows \\[2\\]"):
        data.load_texts(str(tmp_path / "bad.tsv"))


@pytest.mark.parametrize("method", ["kd", "tinybert"])
def test_regression_end_to_end_in_fastkd_train(tiny, tmp_path, method):
    """A head-less teacher is fine-tuned with one output (MSE); the student is distilled with MSE prediction
    losses; dev and test report Pearson and Spearman, which agree with scipy's on the saved student."""
    import numpy as np
    import torch
    from scipy import stats
    from transformers import AutoModelForSequenceClassification

    from fastkd.training.engine import evaluate
    from tests.helpers import make_teacher

    teacher = make_teacher(tmp_path / "encoder", head=False)
    files = {split: _regression_file(tmp_path, f"{split}.tsv", n, seed)
             for split, n, seed in (("train", 48, 1), ("dev", 16, 2), ("test", 16, 3))}
    argv = args_for(tiny, tmp_path / "out", method, "--cache-dir", str(tmp_path / "cache"))
    for flag, split in (("--task", "train"), ("--dev", "dev"), ("--test", "test"), ("--teacher", None)):
        argv[argv.index(flag) + 1] = str(files[split]) if split else str(teacher)
    res = run_cli(argv)
    recs = read_metrics(tmp_path / "out")
    evals = [r for r in recs if r.get("event") == "eval"]
    assert evals and all("dev_pearson" in r and "dev_spearman" in r and "dev_acc" not in r for r in evals)
    assert "dev_pearson" in res["best"]
    student = AutoModelForSequenceClassification.from_pretrained(tmp_path / "out" / "student")
    assert student.config.num_labels == 1
    test = res["trainer"].data["test"]
    got = evaluate(student, test, 64, torch.device("cpu"), res["trainer"].pad_id)
    assert got["pearson"] == pytest.approx(res["student_test_pearson"], abs=1e-6)
    with torch.no_grad():
        pred = np.array([student(input_ids=torch.tensor([ids])).logits[0, 0].item() for ids in test["input_ids"]])
    gold = np.array(test["label"])
    if np.ptp(pred) > 0:
        # per-example forwards vs padded batches: the logits differ in the last bits
        assert got["pearson"] == pytest.approx(stats.pearsonr(pred, gold)[0], abs=1e-4)
        assert got["spearman"] == pytest.approx(stats.spearmanr(pred, gold)[0], abs=1e-4)
    last = [r for r in recs if "loss_soft_ce" in r or "loss_hard_ce" in r]
    assert last and all(math.isfinite(v) for r in last for k, v in r.items() if k.startswith("loss"))


def test_correlations_match_scipy():
    import numpy as np
    from scipy import stats

    from fastkd.training.engine import correlations

    rng = np.random.default_rng(0)
    x = rng.normal(size=50)
    y = x + rng.normal(size=50)
    y[:10] = y[0]  # ties
    got = correlations(x, y)
    assert got["pearson"] == pytest.approx(stats.pearsonr(x, y)[0], abs=1e-12)
    assert got["spearman"] == pytest.approx(stats.spearmanr(x, y)[0], abs=1e-12)
    assert correlations(np.ones(5), y[:5]) == {"pearson": 0.0, "spearman": 0.0}


def test_regression_through_the_hf_trainer(tiny, tmp_path):
    """One-output teacher and student: the prediction losses are MSE (TinyBERT's rule for regression)."""
    import torch
    from transformers import AutoTokenizer, TrainingArguments

    from fastkd.distill.hf import DistillationTrainer
    from fastkd.models.encoder import resized_config
    from fastkd.models.teacher import load_model

    teacher = load_model(tiny["teacher"], head=True, num_labels=1, ignore_mismatched_sizes=True)
    torch.manual_seed(0)
    student = type(teacher)(resized_config(teacher.config, num_layers=2, hidden_size=32, num_heads=4,
                                           intermediate_size=64))
    tok = AutoTokenizer.from_pretrained(tiny["teacher"])
    trainer = DistillationTrainer(model=student, teacher_model=teacher, method="kd", epochs=1, args=TrainingArguments(
        str(tmp_path / "hf"), per_device_train_batch_size=24, logging_steps=1, report_to="none", use_cpu=True,
        save_strategy="no", disable_tqdm=True), train_dataset=data.load_texts(str(_regression_file(tmp_path))),
        processing_class=tok, max_length=24)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(24)])
    assert batch["labels"].dtype == torch.float32
    out = trainer.distiller(**batch)
    with torch.no_grad():
        t = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, 0]
    s = out.logits[:, 0]
    alpha = trainer.distiller.stage.terms[0].weight
    assert torch.allclose(out.terms["soft_ce"], alpha * torch.mean((s - t) ** 2), rtol=1e-5)
    assert torch.allclose(out.terms["hard_ce"], (1 - alpha) * torch.mean((s - batch["labels"]) ** 2), rtol=1e-5)
    trainer.train()
    assert math.isfinite(trainer.state.log_history[0]["loss_hard_ce"])
