"""Data sources beyond TSV files: Parquet (files, folders, hub-style shards), save_to_disk folders, Dataset and
DatasetDict objects, hub names (refused clearly offline) and regression labels."""

from __future__ import annotations

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
    assert cfg.task.startswith("datasetdict-")  # the run's identity names the data by fingerprint
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


def _regression_file(tmp_path):
    lines = ["sentence\tscore"] + [f"{' '.join(['good'] * (i % 5 + 1))}\t{i % 5 + 0.25 * (i % 3)}" for i in range(24)]
    (tmp_path / "sts.tsv").write_text("\n".join(lines) + "\n")
    return tmp_path / "sts.tsv"


def test_float_labels_are_regression_not_classes(tiny, tmp_path):
    """Real-number labels once trained silently as one class per distinct value (dev accuracy 0)."""
    path = _regression_file(tmp_path)
    ds = data.load_texts(str(path))
    assert data.is_regression(ds) and ds.features["label"].dtype == "float32"
    assert ds["label"][:3] == [0.0, 1.25, 2.5]
    argv = _without_data_flags(args_for(tiny, tmp_path / "out", "kd", "--task", str(path)))
    with pytest.raises(ValueError, match="labels are real numbers.*regression.*DistillationTrainer"):
        run_cli(argv)
    assert not (tmp_path / "out" / "metrics.jsonl").exists()


def test_regression_through_the_hf_trainer(tiny, tmp_path):
    """One-output teacher and student: the prediction losses are MSE (TinyBERT's rule for regression)."""
    import torch
    from transformers import AutoTokenizer, TrainingArguments

    from fastkd.encoder import resized_config
    from fastkd.hf import DistillationTrainer
    from fastkd.teacher import load_model

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
