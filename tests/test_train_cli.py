"""The trainer's command line: errors before any training, --config/--set, --help, NaN stops, its output."""

from __future__ import annotations

import json

import pytest
import torch

from fastkd import terms, train
from fastkd.training import engine
from fastkd.training import trainer as trainer_mod
from tests.helpers import make_teacher
from tests.train_support import args_for, expect_error, run_cli


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
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda *a, **k: calls.append(a) or torch.tensor(1.0))
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

    from fastkd.recipes import method_entry, methods

    parser = train.build_parser()
    undocumented = [a.option_strings for a in parser._actions if not (a.help or "").strip()]
    assert not undocumented, f"options without help: {undocumented}"
    text = parser.format_help()
    # every trainer option is a CLI flag, and every recipe setting --set accepts is listed with its default
    for f in dataclasses.fields(train.TrainConfig):
        if f.name != "overrides":
            assert f.metadata.get("help"), f.name
    for method, cls in ((m, method_entry(m).params) for m in methods()):
        assert method in text
        for f in dataclasses.fields(cls):
            assert f"{f.name}={getattr(cls(), f.name)}" in text, (method, f.name)
    # numeric defaults of 0 and 1 are shown (0 == False and 1 == True must not hide them)
    assert "micro-batches per optimizer step (default: 1)" in " ".join(text.split())


