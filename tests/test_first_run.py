"""What a newcomer meets first (#21): the CLI's defaults and messages, a first run offline, the progress of the
teacher's fine-tune, what a finished run leaves on disk."""

from __future__ import annotations

import pytest

from fastkd import train
from tests.helpers import make_teacher
from tests.train_support import args_for, run_cli

pytestmark = pytest.mark.usefixtures("one_thread")


def test_offline_without_data_fails_at_once_naming_the_paths(tmp_path, monkeypatch):
    # No FASTKD_DATA_DIR, no network: datasets retried the hub for 80 s before an error naming no path.
    import datasets

    from fastkd import data

    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "FASTKD_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("FASTKD_DATA_DIR", str(tmp_path / "nothing"))
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # a closed port: refused at once, like no network
    monkeypatch.chdir(tmp_path)
    data.hub_reachable.cache_clear()

    def no_hub(*a, **k):
        raise AssertionError("the hub was tried although it is unreachable")

    monkeypatch.setattr(datasets, "load_dataset", no_hub)
    try:
        with pytest.raises(data.DataNotFoundError, match=r"no sst2 train split found\. Tried: .*nothing/sst2/train"
                                                         r"\.tsv.*columns sentence<TAB>label.*FASTKD_DATA_DIR=<dir>.*"
                                                         r"hub is not reachable from this machine"):
            train.run(train.parse_config(["--method", "tinybert", "--no-progress"]), log=lambda *_: None)
    finally:
        data.hub_reachable.cache_clear()
    assert not (tmp_path / "runs").exists()  # an error before training leaves no folder behind


def test_an_error_before_training_leaves_no_folder_and_wraps(tiny, tmp_path, capsys):
    # --task nonexistent.tsv once printed a 1,000-character line and left runs/<name>/.lock behind.
    out = tmp_path / "runs" / "x"
    argv = args_for(tiny, out, "kd")
    argv[argv.index("--task") + 1] = str(tmp_path / "nonexistent.tsv")
    assert train.main(argv) == 2
    err = capsys.readouterr().err
    assert "fastkd.train: error: data:" in err and "nonexistent.tsv" in err
    assert max(len(line) for line in err.splitlines()) <= 100 and len(err.splitlines()) > 3
    assert not (tmp_path / "runs").exists()


def test_a_label_column_of_another_name_is_named_in_the_error(tiny, tmp_path):
    # id,utterance,y: the header was read as a record ("id" a text), then "has no labels" named no column.
    rows = ["id,utterance,y"] + [f"{i},{t},{i % 2}" for i, t in enumerate(["good film", "bad film", "nice plot",
                                                                          "awful acting"] * 4)]
    (tmp_path / "train.csv").write_text("\n".join(rows) + "\n")
    argv = args_for(tiny, tmp_path / "out", "kd")
    argv[argv.index("--task") + 1] = str(tmp_path / "train.csv")
    with pytest.raises(ValueError, match=r"--task: found no label column in .*train\.csv: its columns are id, "
                                         r"utterance, y, none named label/labels/.*Name the label column with "
                                         r"--label-column \(and the text column with --text-column\)"):
        run_cli(argv)
    from fastkd.data import load_texts

    ds = load_texts(tmp_path / "train.csv", label_column="y")
    assert ds[0] == {"text": "good film", "label": 0} and len(ds) == 16  # the header is no record; id not the text


def test_a_misspelt_choice_gets_a_suggestion():
    with pytest.raises(ValueError, match=r"--method: expected one of .*, got 'tinybret' \(did you mean tinybert\?\)"):
        train.parse_config(["--method", "tinybret"])
    with pytest.raises(ValueError, match=r"--etd: expected one of auto, impt, rand, none, got 'imp' \(did you mean "
                                         r"impt\?\)"):
        train.parse_config(["--etd", "imp"])


def test_help_has_no_markup():
    text = train.build_parser().format_help()
    assert "``" not in text and "--etd {auto,impt,rand,none}" in text


def test_the_default_student_is_extracted_by_importance(tiny, tmp_path):
    # Without --etd the student was random and ended at the majority class on the CPU budget.
    assert train.parse_config([]).etd == "auto"
    lines: list[str] = []
    argv = args_for(tiny, tmp_path / "out", "kd")
    argv[argv.index("--etd") + 1] = "auto"
    train.run(train.parse_config(argv), log=lambda m: lines.append(str(m)))
    log = "\n".join(lines)
    assert "student: --etd auto: ETD by importance (impt)" in log
    assert "student: extracting with ETD (impt) from the teacher" in log
    lines.clear()
    argv = args_for(tiny, tmp_path / "wide", "kd", "--student-hidden", "48", "--student-heads", "4")
    argv[argv.index("--etd") + 1] = "auto"  # wider than the 32-wide teacher: ETD cannot make it
    train.run(train.parse_config(argv), log=lambda m: lines.append(str(m)))
    assert "student: --etd auto: random initialisation, since ETD cannot make this student (hidden_size: " \
           "expected at most the teacher's hidden_size (32), got 48)" in "\n".join(lines)


def test_the_teachers_fine_tune_shows_a_progress_bar(tiny, tmp_path, monkeypatch, capfd):
    monkeypatch.setenv("FASTKD_CACHE_DIR", str(tmp_path / "cache"))
    argv = [a for a in args_for(tiny, tmp_path / "out", "kd", "--finetune-epochs", "1") if a != "--no-progress"]
    argv[argv.index("--teacher") + 1] = str(make_teacher(tmp_path / "bare", head=False))
    run_cli(argv)
    err = capfd.readouterr().err
    assert "teacher fine-tune" in err and "batch" in err  # the tqdm bar the stages have, with its own name


def test_a_finished_run_keeps_what_a_user_needs(tiny, tmp_path):
    # A default run left 532 MB, 398 MB of it mid-run checkpoints no one would resume.
    out = tmp_path / "out"
    lines: list[str] = []
    argv = [a for a in args_for(tiny, out, "tinybert") if a != "--keep-run-checkpoints"]
    train.run(train.parse_config(argv), log=lambda m: lines.append(str(m)))
    assert not (out / "checkpoints").exists()
    for kept in ("student", "best", "metrics.jsonl", "loss.png", "result.json"):
        assert (out / kept).exists(), kept
    assert "checkpoints: removed the mid-run checkpoints" in "\n".join(lines)
    with pytest.raises(ValueError, match=r"--resume: .* holds a finished run \(result\.json\), whose mid-run "
                                         r"checkpoints were removed"):
        run_cli(argv + ["--resume"])
    run_cli(args_for(tiny, tmp_path / "kept", "kd"))  # --keep-run-checkpoints: they stay
    assert list((tmp_path / "kept" / "checkpoints").glob("step-*.pt"))
