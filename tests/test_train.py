"""End-to-end trainer tests on a tiny random BERT teacher and tiny local TSVs (seconds each on a CPU)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

from fastkd import distill, engine, rundata, terms, train
from fastkd import teacher as teacher_mod
from fastkd import trainer as trainer_mod
from tests.helpers import POSITIVE, WORDS, make_sentences, make_teacher, tiny_bert_config, write_task, write_tokenizer  # noqa: F401


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models gain nothing from threads; on a shared 2-core box they only oversubscribe."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {"teacher": make_teacher(root / "teacher"), "data": write_task(root / "data"), "root": root}


def args_for(tiny, out: Path, method: str, *extra: str) -> list[str]:
    return ["--method", method, "--teacher", str(tiny["teacher"]), "--task", str(tiny["data"] / "train.tsv"),
            "--dev", str(tiny["data"] / "dev.tsv"), "--test", str(tiny["data"] / "test.tsv"), "--output-dir",
            str(out), "--student-layers", "2", "--student-hidden", "32", "--student-heads", "4", "--student-ffn",
            "64", "--batch-size", "8", "--epochs", "1", "--log-every", "1", "--latency-runs", "2", "--no-progress",
            "--cache", "off", "--max-length", "24", *extra]


def run_cli(argv: list[str]) -> dict:
    cfg = train.parse_config(argv)
    res = train.run(cfg, log=lambda *_: None)
    return res


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]


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
    with pytest.raises(ValueError, match="has no labels"):  # "sentiment" is not a label name fastkd tries
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


def _without(argv: list[str], *flags: str) -> list[str]:
    out = list(argv)
    for flag in flags:
        i = out.index(flag)
        del out[i:i + 2]
    return out


def test_folder_task_uses_its_own_dev_and_test_splits(tiny, tmp_path):
    argv = _without(args_for(tiny, tmp_path / "run", "kd"), "--dev", "--test")
    argv[argv.index("--task") + 1] = str(tiny["data"])  # a folder holding train.tsv, dev.tsv, test.tsv
    logs = []
    res = train.run(train.parse_config(argv), log=logs.append)
    assert res["test_examples"] == 16 and len(res["trainer"].data["dev"]) == 16
    assert len(res["trainer"].data["task"]) == 48 and not any("holding out" in str(m) for m in logs)


def test_single_file_task_holds_out_dev_and_reports_without_test(tiny, tmp_path):
    argv = _without(args_for(tiny, tmp_path / "run", "kd"), "--dev", "--test")  # --task is train.tsv alone
    logs = []
    res = train.run(train.parse_config(argv), log=logs.append)
    tr = res["trainer"]
    assert len(tr.data["dev"]) == 4 and len(tr.data["task"]) == 44  # 10 % of 48 held out for model selection
    assert any("holding out 4 train examples as dev" in str(m) for m in logs)
    assert "student_test_acc" not in res and res["speedup"] > 0  # no test split: no test accuracy, no crash
    assert "test accuracy" not in train.report(res, "")


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


def test_cache_epoch2_matches_live_teacher_and_skips_forward(tiny, tmp_path, monkeypatch):
    """Epoch 2 with the cache: same losses as a live teacher (fp16 storage tolerance), no teacher forward."""
    calls = {"n": 0}
    real_call = teacher_mod.TeacherRunner.__call__

    def counting(self, batch, host=None):
        before = self.calls
        out = real_call(self, batch, host)
        calls["n"] += self.calls - before
        return out

    monkeypatch.setattr(teacher_mod.TeacherRunner, "__call__", counting)
    results = {}
    for mode in ("off", "memory", "device"):
        calls["n"] = 0
        out = tmp_path / mode
        argv = args_for(tiny, out, "tinybert", "--epochs", "2", "--set", "tinybert.pred_epochs=1")
        argv[argv.index("--cache") + 1] = mode
        res = run_cli(argv)
        results[mode] = (read_metrics(out), calls["n"], res)
    live, cached = results["off"][0], results["memory"][0]
    # The device cache holds the same fp16 values as the host cache: the same run, loss for loss.
    on_device = results["device"][0]
    assert results["device"][1] == results["memory"][1]
    assert [m["loss"] for m in on_device if "loss" in m and "event" not in m] == \
           [m["loss"] for m in cached if "loss" in m and "event" not in m]
    steps_per_epoch = len([m for m in live if m.get("stage") == "intermediate" and m.get("epoch") == 0
                           and "event" not in m])
    n_stage_steps = sum(1 for m in live if m.get("stage") in ("intermediate", "prediction") and "event" not in m)
    assert results["off"][1] == n_stage_steps  # live teacher: one forward per step
    assert results["memory"][1] == steps_per_epoch * 2  # cached: epoch 1 of each stage only
    cache_recs = [m for m in cached if m.get("event") == "cache"]
    assert cache_recs and all(abs(r["hit_rate"] - 0.5) < 1e-9 for r in cache_recs)
    live_steps = [m for m in live if "loss" in m and "event" not in m]
    cached_steps = [m for m in cached if "loss" in m and "event" not in m]
    for a, b in zip(live_steps, cached_steps, strict=True):
        assert (a["step"], a["stage"]) == (b["step"], b["stage"])
        for k in a:
            if k.startswith("loss"):
                # fp16 storage of the teacher's activations: ~1e-3 relative per value
                assert abs(a[k] - b[k]) <= 2e-2 * abs(a[k]) + 1e-4, (k, a, b)
    # Epoch 1 reads no cache, so its losses are identical; epoch 2 reads fp16 activations: close, not equal.
    first = [(a, b) for a, b in zip(live_steps, cached_steps, strict=True) if a["epoch"] == 0]
    assert all(a["loss"] == b["loss"] for a, b in first[:steps_per_epoch])


@pytest.mark.parametrize("cache", ["memory", "device"])
@pytest.mark.parametrize("teacher_dtype", ["fp16", "bf16"])
@pytest.mark.parametrize("method", ["tinybert", "minilm", "bert-emd", "pkd-skip"])
def test_gpu_defaults_half_teacher_bf16_amp_memory_cache(tiny, tmp_path, monkeypatch, method, teacher_dtype,
                                                         cache):
    """What a GPU run does by default -- a half-precision teacher, bf16 AMP, the memory cache over several epochs --
    here on the CPU: every stage trains with finite losses, epoch 2 reads the cache, and a stage that needs nothing
    from the teacher (MiniLM's fine-tune) neither caches nor runs it. (Under bf16 autocast, torch.stack of fp16
    teacher tensors failed, and an empty capture crashed the cache.)"""
    monkeypatch.setenv("FASTKD_BACKEND", "torch")
    out = tmp_path / "run"
    res = run_cli(args_for(tiny, out, method, "--teacher-dtype", teacher_dtype, "--amp", "bf16", "--cache", cache,
                           "--epochs", "2"))
    tr, metrics = res["trainer"], read_metrics(out)
    steps = [m for m in metrics if "loss" in m and "event" not in m]
    caches = {m["stage"]: m for m in metrics if m.get("event") == "cache"}
    forwards = 0
    for stage in tr.recipe.stages:
        mine = [m for m in steps if m["stage"] == stage.name]
        assert mine and all(torch.isfinite(torch.tensor(m["loss"])) for m in mine), stage.name
        fields = terms.plan_fields(terms.capture_plan(stage.terms, "teacher"), tr.shapes.teacher_layers)
        if not fields:
            assert stage.name not in caches
            continue
        per_epoch = len(mine) // 2
        assert caches[stage.name]["teacher_forwards"] == per_epoch  # epoch 1 only
        assert caches[stage.name]["hit_rate"] == pytest.approx(0.5)
        forwards += per_epoch
    assert res["teacher_forwards"] == forwards
    assert any(not terms.plan_fields(terms.capture_plan(s.terms, "teacher"), tr.shapes.teacher_layers)
               for s in tr.recipe.stages) == (method == "minilm")


@pytest.mark.parametrize("method", ["tinybert", "minilm"])
def test_fused_losses_in_the_trainer_match_eager(tiny, tmp_path, monkeypatch, method):
    """The trainer with the fused Triton losses (what every GPU run uses; the interpreter here) under the GPU
    defaults -- fp16 teacher run under inference mode, bf16 AMP, device cache: the same losses as the eager
    references, step for step, within the kernels' fp32-accumulation tolerance."""
    runs = {}
    for backend in ("torch", "triton"):
        monkeypatch.setenv("FASTKD_BACKEND", backend)
        out = tmp_path / backend
        run_cli(args_for(tiny, out, method, "--teacher-dtype", "fp16", "--amp", "bf16", "--cache", "device",
                         "--epochs", "2"))
        runs[backend] = [m for m in read_metrics(out) if "loss" in m and "event" not in m]
    assert len(runs["torch"]) == len(runs["triton"]) > 0
    for a, b in zip(runs["torch"], runs["triton"], strict=True):
        for k in a:
            if k.startswith("loss"):
                assert math.isfinite(b[k]) and abs(a[k] - b[k]) <= 2e-3 * abs(a[k]) + 1e-5, (k, a, b)


@pytest.mark.parametrize("budget,expected", [(None, "memory"), (10**9, "device"), (10, "memory")])
def test_cache_auto_picks_device_when_the_activations_fit(tiny, tmp_path, monkeypatch, budget, expected):
    """--cache auto (the default): the device cache when the dataset's activations fit the GPU budget, else the
    host memory cache; without a GPU (budget None) always the host cache."""
    monkeypatch.setattr(trainer_mod.Trainer, "_device_cache_budget", lambda self: budget)
    out = tmp_path / "run"
    logs = []
    train.run(train.parse_config(args_for(tiny, out, "tinybert", "--cache", "auto", "--epochs", "2")), log=logs.append)
    modes = {m["stage"]: m["mode"] for m in read_metrics(out) if m.get("event") == "cache"}
    assert modes == {"intermediate": expected, "prediction": expected}
    assert any(f"teacher cache (auto): {expected} for stage intermediate" in x for x in logs)
    assert train.TrainConfig().cache == "auto"


def test_disk_cache_reused_across_runs(tiny, tmp_path):
    calls = []
    for i in range(2):
        out = tmp_path / f"run{i}"
        argv = args_for(tiny, out, "kd", "--cache-dir", str(tmp_path / "c"))
        argv[argv.index("--cache") + 1] = "disk"
        res = run_cli(argv)
        calls.append(res["teacher_forwards"])
    assert calls[0] > 0 and calls[1] == 0
    assert list((tmp_path / "c" / "activations").glob("*/manifest-rank0.json"))  # the shards under --cache-dir


# ---------------------------------------------------------------- errors before training


def expect_error(tiny, tmp_path, match, *argv_changes, extra=()):
    argv = args_for(tiny, tmp_path / "err", "tinybert", *extra)
    for k, v in argv_changes:
        argv[argv.index(k) + 1] = v
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        run_cli(argv)
    assert not (tmp_path / "err" / "metrics.jsonl").exists()  # nothing trained


def test_error_unknown_method(tiny, tmp_path):
    with pytest.raises(ValueError, match="--method: expected one of"):
        train.parse_config(["--method", "distilbert"])
    assert train.main(["--method", "nope"]) == 2


@pytest.mark.parametrize("flag,value,expected", [
    ("--epochs", "0", "--epochs: expected a positive integer, got 0"),
    ("--log-every", "0", "--log-every: expected a positive integer"),
    ("--keep-checkpoints", "0", "--keep-checkpoints: expected a positive integer"),
    ("--save-every", "-1", "--save-every: expected 0 or a positive integer"),
    ("--warmup", "1.5", r"--warmup: expected a fraction of the steps in \[0, 1\], got 1.5"),
    ("--max-grad-norm", "-1", "--max-grad-norm: expected a finite number >= 0"),
    ("--weight-decay", "nan", "--weight-decay: expected a finite number >= 0, got nan"),
    ("--max-train-examples", "-3", r"--max-train-examples: expected 0 \(all the data\) or a positive count"),
])
def test_error_bad_trainer_option(flag, value, expected):
    with pytest.raises(ValueError, match=expected):
        train.parse_config([flag, value])
    assert train.main([flag, value]) == 2


def test_error_bad_option_in_code_built_config():
    """A config built in code (not through the CLI) is held to the same rules, choices included."""
    with pytest.raises(ValueError, match="--cache: expected one of auto, off, memory, disk, device, got 'gpu'"):
        train.TrainConfig(cache="gpu")
    with pytest.raises(ValueError, match="--batch-size: expected a positive integer, got 0"):
        train.TrainConfig(batch_size=0)


def test_max_grad_norm_zero_switches_clipping_off(tiny, tmp_path, monkeypatch):
    """0 means no clipping; clip_grad_norm_(…, 0) would instead scale every gradient to zero."""
    calls = []
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda *a, **k: calls.append(a))
    before = {}

    def snapshot(self, *a, **k):
        before.update({k: v.detach().clone() for k, v in self.module.student.state_dict().items()})
        return orig(self, *a, **k)

    orig = trainer_mod.Trainer.train
    monkeypatch.setattr(trainer_mod.Trainer, "train", snapshot)
    res = run_cli(args_for(tiny, tmp_path / "run", "kd", "--max-grad-norm", "0"))
    assert not calls
    after = res["trainer"].module.student.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the student still learned
    calls.clear()
    run_cli(args_for(tiny, tmp_path / "run2", "kd", "--max-grad-norm", "0.5"))
    assert calls and all(a[1] == 0.5 for a in calls)


def test_error_max_length_beyond_the_teachers_positions(tiny, tmp_path):
    # the tiny teacher has 64 position embeddings: a longer --max-length would fail deep inside the embeddings
    expect_error(tiny, tmp_path, r"--max-length: expected at most 64 \(the teacher's position embeddings\), got 65",
                 ("--max-length", "65"))


def test_error_heads_mismatch(tiny, tmp_path):
    expect_error(tiny, tmp_path, r"same head count.*--student-heads 4", ("--student-heads", "2"))


def test_error_too_deep(tiny, tmp_path):
    expect_error(tiny, tmp_path, r"--student-layers to at most 4", ("--student-layers", "6"))


def test_error_pkd_width(tiny, tmp_path):
    expect_error(tiny, tmp_path, r"--student-hidden 32", ("--method", "pkd-skip"), ("--student-hidden", "16"),
                 extra=("--set", "pkd.project_width=false"))


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


def test_error_missing_data(tiny, tmp_path):
    expect_error(tiny, tmp_path, r"Tried", ("--task", "sst2"), ("--dev", str(tmp_path / "nowhere.tsv")))


def test_error_missing_task_dir(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("FASTKD_DATA_DIR", str(tmp_path / "nodata"))
    monkeypatch.setenv("FASTKD_OFFLINE", "1")
    argv = args_for(tiny, tmp_path / "err", "kd")
    for flag in ("--dev", "--test"):
        i = argv.index(flag)
        del argv[i:i + 2]
    argv[argv.index("--task") + 1] = "sst2"
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nodata")):
        run_cli(argv)


def test_error_label_set(tiny, tmp_path):
    teacher = make_teacher(tmp_path / "t3", num_labels=3)
    expect_error(tiny, tmp_path, r"task head has 3 labels.*has 2", ("--teacher", str(teacher)))


def test_error_label_names(tiny, tmp_path):
    teacher = make_teacher(tmp_path / "t_named")
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(teacher)
    cfg.id2label, cfg.label2id = {0: "World", 1: "Sports"}, {"World": 0, "Sports": 1}
    cfg.save_pretrained(teacher)
    data = tmp_path / "named"
    data.mkdir()
    for split in ("train", "dev", "test"):
        rows = (tiny["data"] / f"{split}.tsv").read_text().splitlines()
        named = [rows[0]] + [r.rsplit("\t", 1)[0] + "\t" + ("positive" if r.endswith("1") else "negative")
                             for r in rows[1:]]
        (data / f"{split}.tsv").write_text("\n".join(named) + "\n")
    expect_error(tiny, tmp_path, r"predicts \['World', 'Sports'\] but .* \['negative', 'positive'\]",
                 ("--teacher", str(teacher)), ("--task", str(data / "train.tsv")), ("--dev", str(data / "dev.tsv")),
                 ("--test", str(data / "test.tsv")))


def test_error_output_dir_holds_another_run(tiny, tmp_path):
    out = tmp_path / "err"
    out.mkdir()
    (out / "run.json").write_text(json.dumps({"identity": {"method": "kd"}, "started": "yesterday"}))
    expect_error(tiny, tmp_path, r"already holds another run \(method kd")
    (out / "run.json").unlink()
    (out / "notes.txt").write_text("x")
    expect_error(tiny, tmp_path, r"already holds other files")


def test_error_bad_override(tiny, tmp_path):
    expect_error(tiny, tmp_path, r"tinybert has no setting 'att_wieght'", extra=("--set", "tinybert.att_wieght=2"))


def test_nan_loss_stops_naming_step_term_and_checkpoint(tiny, tmp_path, monkeypatch):
    real = terms.losses.attention_mse
    state = {"n": 0}

    def poisoned(*a, **k):
        state["n"] += 1
        v = real(*a, **k)
        return v * float("nan") if state["n"] > 6 else v  # 2 pairs per step: step 4 goes bad

    monkeypatch.setattr(terms.losses, "attention_mse", poisoned)
    argv = args_for(tiny, tmp_path / "nan", "tinybert", "--save-every", "2")
    with pytest.raises(engine.NonFiniteLossError, match=r"step 4 .*att_mse=nan.*step-2\.pt"):
        run_cli(argv)


def test_cli_output_is_fastkds_own(tiny, tmp_path, capfd):
    """The CLI prints fastkd's lines; the libraries' progress bars and load reports stay quiet."""
    from transformers.utils import logging as hf_logging

    before = hf_logging.get_verbosity()
    try:
        assert train.main(args_for(tiny, tmp_path / "run", "kd")) == 0
    finally:
        hf_logging.set_verbosity(before)
        hf_logging.enable_progress_bar()
        import datasets

        datasets.enable_progress_bars()
    out, err = capfd.readouterr()
    assert "student test accuracy" in out and "student saved to" in out
    for noise in ("Loading weights", "Writing model shards", "LOAD REPORT", "Map:", "Generating train split"):
        assert noise not in out + err, noise


def test_config_file_and_set_override(tiny, tmp_path):
    cfgfile = tmp_path / "c.yaml"
    cfgfile.write_text("tinybert:\n  att_weight: 3\n  hidden_weight: 0.5\ntrain:\n  batch_size: 4\n")
    cfg = train.parse_config(["--config", str(cfgfile), "--set", "tinybert.att_weight=2"])
    assert cfg.batch_size == 4
    from fastkd.recipes import make_params

    p = make_params("tinybert", cfg.overrides)
    assert p.att_weight == 2.0 and p.hidden_weight == 0.5


def test_cli_help_explains_every_option_and_lists_recipe_settings():
    import dataclasses

    from fastkd.recipes import PARAMS

    parser = train.build_parser()
    undocumented = [a.option_strings for a in parser._actions if not (a.help or "").strip()]
    assert not undocumented, f"options without help: {undocumented}"
    text = parser.format_help()
    # every trainer option is a CLI flag, and every recipe setting --set accepts is listed with its default
    for f in dataclasses.fields(train.TrainConfig):
        if f.name != "overrides":
            assert f.metadata.get("help"), f.name
    for method, cls in PARAMS.items():
        assert method in text
        for f in dataclasses.fields(cls):
            assert f"{f.name}={getattr(cls(), f.name)}" in text, (method, f.name)
    # numeric defaults of 0 and 1 are shown (0 == False and 1 == True must not hide them)
    assert "micro-batches per optimizer step (default: 1)" in " ".join(text.split())


def _ddp_worker(rank, world, port, argv, q):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        cfg = train.parse_config(argv)
        trainer = trainer_mod.Trainer(cfg, log=lambda *_: None)
        trainer.setup()
        trainer.train()
        sd = {k: v.clone() for k, v in trainer.module.student.state_dict().items()}
        q.put((rank, None, sum(float(v.double().sum()) for v in sd.values()), trainer.global_step,
               [c["hit_rate"] for c in trainer.cache_stats]))
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
    except Exception as e:  # report to the parent instead of hanging it
        q.put((rank, repr(e), None, None, None))


def test_ddp_two_processes_gloo(tiny, tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = args_for(tiny, tmp_path / "ddp", "bert-emd", "--cache-dir", str(tmp_path / "cache"))
    argv[argv.index("--cache") + 1] = "disk"
    argv[argv.index("--epochs") + 1] = "2"
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_ddp_worker, args=(r, 2, port, argv, q)) for r in range(2)]
    for p in procs:
        p.start()
    got = sorted(q.get(timeout=180) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    assert [g[1] for g in got] == [None, None], got
    # 48 examples, batch 8, 2 ranks: 3 steps per rank and epoch; both ranks hold identical weights (synced
    # gradients and EMD layer weights).
    assert got[0][3] == got[1][3] == 6
    # Epoch 2 reads what either rank stored in epoch 1 (disk shards shared after a barrier): half the batches hit.
    assert got[0][4] == got[1][4] == [0.5]
    assert got[0][2] == pytest.approx(got[1][2], rel=0, abs=1e-6)
    assert (tmp_path / "ddp" / "metrics.jsonl").is_file()


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
