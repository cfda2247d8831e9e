"""The trainer's data and teacher options: fine-tune data and seeds, subsets, columns, sentence pairs, splits."""

from __future__ import annotations

import json

import pytest
import torch

from fastkd import train
from fastkd.models import teacher as teacher_mod
from fastkd.training import rundata
from tests.helpers import make_teacher
from tests.train_support import args_for, read_metrics, run_cli, without


@pytest.mark.parametrize("saved", [torch.float16, torch.bfloat16])
def test_half_precision_teacher_checkpoint_gives_fp32_student(tiny, tmp_path, monkeypatch, saved):
    """Many checkpoints are saved in fp16/bf16, and transformers >= 5 loads a checkpoint in its stored dtype.
    The teacher's fine-tune and the student extracted from it must still be fp32 (AMP does the half precision)."""
    from transformers import BertModel

    teacher = make_teacher(tmp_path / "half", head=False)
    BertModel.from_pretrained(teacher, dtype=saved).save_pretrained(teacher)  # overwrite in half precision
    from safetensors import safe_open

    with safe_open(str(teacher / "model.safetensors"), "pt") as f:
        assert f.get_tensor(next(iter(f.keys()))).dtype == saved
    monkeypatch.setenv("FASTKD_CACHE_DIR", str(tmp_path / "cache"))
    argv = args_for(tiny, tmp_path / "run", "tinybert", "--finetune-examples", "0", "--finetune-epochs", "1")
    argv[argv.index("--teacher") + 1] = str(teacher)
    res = run_cli(argv)
    tr = res["trainer"]
    assert {p.dtype for p in tr.module.student.parameters()} == {torch.float32}
    with safe_open(str(tr.teacher_paths["finetuned"] / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float32}  # fine-tuned in fp32
    losses = [m["loss"] for m in read_metrics(tmp_path / "run") if "loss" in m and "event" not in m]
    assert losses and all(torch.isfinite(torch.tensor(v)) for v in losses)


def test_finetune_examples_sets_the_teachers_data(tiny, tmp_path, monkeypatch):
    """--finetune-examples decouples the teacher's fine-tune data from the student's (smaller) subset."""
    teacher = make_teacher(tmp_path / "bare", head=False)
    monkeypatch.setenv("FASTKD_CACHE_DIR", str(tmp_path / "cache"))
    for n_ft, expected in (("0", 48), ("20", 20)):  # 0 = all 48 training examples
        argv = args_for(tiny, tmp_path / f"run{n_ft}", "kd", "--max-train-examples", "16", "--finetune-examples",
                        n_ft, "--finetune-epochs", "1")
        argv[argv.index("--teacher") + 1] = str(teacher)
        res = run_cli(argv)
        assert res["trainer"].data["task"].num_rows == 16
        folder = res["trainer"].teacher_paths["finetuned"]
        assert json.loads((folder / "fastkd-finetune.json").read_text())["examples"] == expected
    assert len(list((tmp_path / "cache" / "teachers").iterdir())) == 2  # different data, different cache key
    with pytest.raises(ValueError, match="--finetune-examples: expected 0"):
        train.parse_config(["--finetune-examples", "-3"])
    with pytest.raises(ValueError, match="--max-train-examples: expected 0"):
        train.parse_config(["--max-train-examples", "-1"])


def test_finetune_seed_shares_one_teacher_across_student_seeds(tiny, tmp_path, monkeypatch):
    """--finetune-seed fixes the teacher's fine-tune, so a --seed sweep varies only the student (one cached
    teacher); without it each seed fine-tunes its own teacher."""
    teacher = make_teacher(tmp_path / "bare", head=False)
    for sweep, fixed in (("fixed", ["--finetune-seed", "0"]), ("free", [])):
        monkeypatch.setenv("FASTKD_CACHE_DIR", str(tmp_path / sweep))
        for seed in ("1", "2"):
            argv = args_for(tiny, tmp_path / f"{sweep}{seed}", "kd", "--seed", seed, "--finetune-examples", "0",
                            "--finetune-epochs", "1", *fixed)
            argv[argv.index("--teacher") + 1] = str(teacher)
            run_cli(argv)
    assert len(list((tmp_path / "fixed" / "teachers").iterdir())) == 1
    assert len(list((tmp_path / "free" / "teachers").iterdir())) == 2
    seeds = [json.loads((tmp_path / f"fixed{s}" / "run.json").read_text())["identity"]["finetune_seed"]
             for s in ("1", "2")]
    assert seeds == [0, 0]


def test_max_train_examples_zero_means_all(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(rundata, "CPU_TRAIN_EXAMPLES", 10)  # the CPU default subset, shrunk below the 48 examples
    sizes = {}
    for flag in (None, "0"):
        argv = args_for(tiny, tmp_path / f"run{flag}", "kd", *(["--max-train-examples", flag] if flag else []))
        sizes[flag] = run_cli(argv)["trainer"].data["task"].num_rows
    assert sizes == {None: 10, "0": 48}


def test_text_and_label_columns_of_data_files(tiny, tmp_path):
    """Data files with their own column names train once --text-column / --label-column name them."""
    files = {}
    for split in ("train", "dev", "test"):
        rows = (tiny["data"] / f"{split}.tsv").read_text().splitlines()[1:]
        f = tmp_path / f"{split}.tsv"
        f.write_text("review\tsentiment\n" + "\n".join(rows) + "\n")
        files[split] = str(f)
    argv = args_for(tiny, tmp_path / "run", "kd")
    for split, flag in (("train", "--task"), ("dev", "--dev"), ("test", "--test")):
        argv[argv.index(flag) + 1] = files[split]
    # "sentiment" is not a label name fastkd tries: the error names the columns it saw and the flag
    with pytest.raises(ValueError, match=r"found no label column in .*: its columns are review, sentiment, .*"
                                         r"--label-column"):
        run_cli(argv)
    res = run_cli(argv[:argv.index("--output-dir") + 1] + [str(tmp_path / "run2")]
                  + argv[argv.index("--output-dir") + 2:] + ["--label-column", "sentiment"])
    assert res["test_examples"] == 16 and 0.0 <= res["student_test_acc"] <= 1.0


def test_sentence_pairs_reach_teacher_and_student_with_segment_ids(tiny, tmp_path, monkeypatch):
    """A sentence-pair task: both texts are encoded as one pair and the segment ids reach every model call."""
    from transformers.models.bert.modeling_bert import BertEmbeddings

    texts = {}
    for split in ("train", "dev", "test"):
        rows = [r.split("\t") for r in (tiny["data"] / f"{split}.tsv").read_text().splitlines()[1:]]
        f = tmp_path / f"{split}.tsv"
        f.write_text("premise\thypothesis\tlabel\n" + "\n".join(f"{t}\t{' '.join(reversed(t.split()))}\t{y}"
                                                                for t, y in rows) + "\n")
        texts[split] = str(f)
    # Which calls saw second-segment ids: the teacher's forward for the losses (inside TeacherRunner) and the
    # student's training forward (gradients on) -- evaluation alone must not satisfy the test.
    saw_segments: set = set()
    in_runner = [False]
    orig, orig_call = BertEmbeddings.forward, teacher_mod.TeacherRunner.__call__

    def forward(self, input_ids=None, token_type_ids=None, *a, **k):
        if token_type_ids is not None and bool((token_type_ids == 1).any()):
            saw_segments.add("teacher-for-losses" if in_runner[0] else (id(self), torch.is_grad_enabled()))
        return orig(self, input_ids, token_type_ids, *a, **k)

    def call(self, *a, **k):
        in_runner[0] = True
        try:
            return orig_call(self, *a, **k)
        finally:
            in_runner[0] = False

    monkeypatch.setattr(BertEmbeddings, "forward", forward)
    monkeypatch.setattr(teacher_mod.TeacherRunner, "__call__", call)
    argv = args_for(tiny, tmp_path / "run", "tinybert")
    for split, flag in (("train", "--task"), ("dev", "--dev"), ("test", "--test")):
        argv[argv.index(flag) + 1] = texts[split]
    res = run_cli(argv)
    tr = res["trainer"]
    assert "text_pair" in tr.data["task"].column_names and "type_start" in tr.data["task"].column_names
    assert (id(tr.module.student.bert.embeddings), True) in saw_segments  # the training forward
    assert "teacher-for-losses" in saw_segments
    assert 0.0 <= res["student_test_acc"] <= 1.0 and res["test_examples"] == 16


def test_folder_task_uses_its_own_dev_and_test_splits(tiny, tmp_path):
    argv = without(args_for(tiny, tmp_path / "run", "kd"), "--dev", "--test")
    argv[argv.index("--task") + 1] = str(tiny["data"])  # a folder holding train.tsv, dev.tsv, test.tsv
    logs = []
    res = train.run(train.parse_config(argv), log=logs.append)
    assert res["test_examples"] == 16 and len(res["trainer"].data["dev"]) == 16
    assert len(res["trainer"].data["task"]) == 48 and not any("holding out" in str(m) for m in logs)


def test_single_file_task_holds_out_dev_and_reportswithout_test(tiny, tmp_path):
    argv = without(args_for(tiny, tmp_path / "run", "kd"), "--dev", "--test")  # --task is train.tsv alone
    logs = []
    res = train.run(train.parse_config(argv), log=logs.append)
    tr = res["trainer"]
    assert len(tr.data["dev"]) == 4 and len(tr.data["task"]) == 44  # 10 % of 48 held out for model selection
    assert any("holding out 4 train examples as dev" in str(m) for m in logs)
    assert "student_test_acc" not in res and res["speedup"] > 0  # no test split: no test accuracy, no crash
    assert "test accuracy" not in train.report(res, "")


