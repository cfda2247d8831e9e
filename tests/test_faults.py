"""Fault injection: what fastkd does when its inputs, files or processes go wrong (issue #15). Each case failed on
the code before its fix: it trained on garbage, kept a bad file, or died with a traceback instead of an error
that says what happened and what was kept."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fastkd import train
from tests.helpers import make_sentences, make_teacher
from tests.train_support import args_for


def _nan_teacher(folder: Path, *, head: bool) -> Path:
    from transformers import AutoModel, AutoModelForSequenceClassification

    make_teacher(folder, head=head)
    model = (AutoModelForSequenceClassification if head else AutoModel).from_pretrained(folder)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))
    model.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("mode", ["general", "task"])
@pytest.mark.parametrize("method", ["minilm", "minilmv2"])
def test_nan_teacher_stops_the_run_naming_field_layer_and_teacher(tiny, tmp_path, capsys, mode, method):
    """A NaN teacher gave loss 0.0 at every step, exit 0 and "student saved" with NaN weights (the softmax of the
    attention and relation losses zeroed it)."""
    teacher = _nan_teacher(tmp_path / "nan-teacher", head=mode == "task")
    out = tmp_path / "run"
    argv = args_for(tiny, out, method)
    argv[argv.index("--teacher") + 1] = str(teacher)
    if mode == "general":
        corpus = tmp_path / "corpus.txt"
        corpus.write_text("\n".join(t for t, _ in make_sentences(24, 5)) + "\n")
        argv += ["--mode", "general", "--general-corpus", str(corpus)]
    assert train.main(argv) == 2
    err = capsys.readouterr().err
    assert "produced NaN/inf in" in err and "layer" in err and str(teacher) in err, err
    assert not (out / "student").exists()


@pytest.mark.parametrize("method", ["kd", "tinybert", "minilm"])
def test_diverging_run_names_only_a_finite_checkpoint(tiny, tmp_path, method):
    """With a huge lr the run stopped at step 3 naming step-2.pt, which held 19-27 non-finite tensors: the finite
    check ran on the loss only, and a finite loss can have non-finite gradients."""
    from fastkd.training.engine import NonFiniteLossError

    def nonfinite(state):  # written here, independent of the library's own check
        tensors = list(state["model"].values()) + [v for s in state["optimizer"]["state"].values()
                                                    for v in s.values() if torch.is_tensor(v)]
        return sum(1 for v in tensors if v.is_floating_point() and not torch.isfinite(v).all())

    prefix = {"kd": "kd", "tinybert": "tinybert", "minilm": "minilm"}[method]
    lrs = {"kd": ["lr"], "tinybert": ["inter_lr", "pred_lr"], "minilm": ["lr", "finetune_lr"]}[method]
    argv = args_for(tiny, tmp_path / "run", method, "--save-every", "1", "--epochs", "2",
                    *[x for lr in lrs for x in ("--set", f"{prefix}.{lr}=1e2")])
    with pytest.raises(NonFiniteLossError) as e:
        train.run(train.parse_config(argv), log=lambda *_: None)
    named = str(e.value).rsplit("last good checkpoint: ", 1)[1]
    on_disk = sorted((tmp_path / "run" / "checkpoints").glob("step-*.pt"))
    for ckpt in on_disk:  # every checkpoint kept is finite, the named one included
        state = torch.load(ckpt, weights_only=False)
        assert nonfinite(state) == 0, ckpt
    assert named.startswith("none") or Path(named) in on_disk


# ---------------------------------------------------------------- item 4: corrupt checkpoints and run files


def _finished_run(tiny, out: Path) -> list[str]:
    argv = args_for(tiny, out, "kd", "--epochs", "2", "--save-every", "1", "--keep-checkpoints", "4")
    train.run(train.parse_config(argv), log=lambda *_: None)
    return argv


def _checkpoints(out: Path) -> list[Path]:
    return sorted((out / "checkpoints").glob("step-*.pt"), key=lambda p: int(p.stem.split("-")[1]))


def _corrupt(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "random4k":
        start = len(data) // 2
        data[start:start + 4096] = torch.randint(0, 256, (min(4096, len(data) - start),), dtype=torch.uint8).tolist()
    elif how == "truncated":
        data = data[: len(data) // 3]
    else:  # empty
        data = bytearray()
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["random4k", "truncated", "empty"])
def test_resume_skips_a_corrupt_newest_checkpoint_and_says_so(tiny, tmp_path, how):
    """4 KiB of random bytes in the newest checkpoint loaded silently (NaN in Adam's exp_avg_sq, diverging 40 steps
    later); a truncated or empty one gave an EOFError/RuntimeError traceback although older ones were intact."""
    out = tmp_path / "run"
    argv = _finished_run(tiny, out)
    newest, older = _checkpoints(out)[-1], _checkpoints(out)[-2]
    _corrupt(newest, how)
    logs: list[str] = []
    train.run(train.parse_config(argv + ["--resume"]), log=logs.append)
    said = "\n".join(logs)
    assert f"checkpoint {newest} is not intact" in said and f"using {older.name}" in said, said
    assert (out / "student" / "model.safetensors").is_file()


def test_resume_with_no_intact_checkpoint_is_a_clear_error(tiny, tmp_path):
    out = tmp_path / "run"
    argv = _finished_run(tiny, out)
    for ckpt in _checkpoints(out):
        _corrupt(ckpt, "truncated")
    with pytest.raises(ValueError, match=r"--resume: no intact checkpoint in .*step-\d+\.pt: its bytes do not match"):
        train.run(train.parse_config(argv + ["--resume"]), log=lambda *_: None)


def test_a_truncated_run_file_is_named(tiny, tmp_path):
    out = tmp_path / "run"
    argv = _finished_run(tiny, out)
    run_file = out / "run.json"
    run_file.write_text(run_file.read_text()[:40])
    with pytest.raises(ValueError, match=rf"--resume: {run_file} is damaged"):
        train.run(train.parse_config(argv + ["--resume"]), log=lambda *_: None)


# ---------------------------------------------------------------- item 8: one run per output folder


def test_a_second_run_in_the_same_output_dir_is_refused(tiny, tmp_path):
    """Two runs sharing one --output-dir interleaved 250 metrics lines (different seeds) or one died on a missing
    .tmp file (same seed). The folder is locked while a run holds it."""
    import fcntl
    import os

    out = tmp_path / "run"
    out.mkdir()
    fd = os.open(out / ".lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # another run holds it
    os.pwrite(fd, b"4242\n", 0)
    try:
        with pytest.raises(ValueError, match=rf"--output-dir: {out} is in use by another run \(pid 4242\)"):
            train.run(train.parse_config(args_for(tiny, out, "kd")), log=lambda *_: None)
    finally:
        os.close(fd)
    train.run(train.parse_config(args_for(tiny, out, "kd")), log=lambda *_: None)  # free again: it runs


# ---------------------------------------------------------------- item 9: unusable output folders


def test_an_output_dir_that_is_a_file_or_read_only_is_refused_before_training(tiny, tmp_path):
    import os

    target = tmp_path / "a-file"
    target.write_text("x")
    with pytest.raises(ValueError, match=r"--output-dir: .*a-file is a file, not a folder"):
        train.run(train.parse_config(args_for(tiny, target, "kd")), log=lambda *_: None)
    if os.geteuid() == 0:
        pytest.skip("root writes into read-only folders; the read-only case needs an ordinary user")
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o555)
    with pytest.raises(ValueError, match=r"--output-dir: .*ro/run is not writable"):
        train.run(train.parse_config(args_for(tiny, ro / "run", "kd")), log=lambda *_: None)


# ---------------------------------------------------------------- item 10: resume and repeat exactness


def _student(out: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(out / "student" / "model.safetensors")


def _memory_cache_run_killed_and_resumed(tiny, tmp_path, monkeypatch, die_at: int = 8
                                         ) -> tuple[dict, dict, list[str]]:
    """(the uninterrupted run's student, the resumed run's student, the resumed run's log): --cache memory, 2
    epochs, the second run stopped right after the checkpoint of step ``die_at`` (8: mid-epoch 2 of the
    intermediate stage; 16: mid-prediction stage) and resumed."""
    from fastkd.training import checkpoint

    argv = args_for(tiny, tmp_path / "ref", "tinybert", "--cache", "memory", "--epochs", "2", "--save-every", "4",
                    "--set", "tinybert.pred_epochs=1")
    train.run(train.parse_config(argv), log=lambda *_: None)
    crashed = tmp_path / "crashed"
    argv_c = [str(crashed) if a == str(tmp_path / "ref") else a for a in argv]
    real = checkpoint.save_checkpoint

    def save_then_die(out, state, *args):
        path = real(out, state, *args)
        if state["global_step"] == die_at:
            raise KeyboardInterrupt
        return path

    monkeypatch.setattr("fastkd.training.trainer.save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train.run(train.parse_config(argv_c), log=lambda *_: None)
    monkeypatch.setattr("fastkd.training.trainer.save_checkpoint", real)
    lines: list[str] = []
    train.run(train.parse_config(argv_c + ["--resume"]), log=lambda m: lines.append(str(m)))
    return _student(tmp_path / "ref"), _student(crashed), lines


def test_memory_cache_resume_is_bit_identical(tiny, tmp_path, monkeypatch):
    """--cache memory with 2 epochs: the cache holds fp16, the restarted run's live teacher gave fp32, and 36
    tensors of the resumed student differed (<= 2e-7)."""
    a, b, _ = _memory_cache_run_killed_and_resumed(tiny, tmp_path, monkeypatch)
    assert [k for k in a if not torch.equal(a[k], b[k])] == []


def test_memory_cache_resume_refills_as_the_first_epoch_did(tiny, tmp_path, monkeypatch):
    """The last bits of a live teacher forward depend on its batch (batch mates, padding, the GEMM's shapes): on
    some machines the resume above ended 1 ulp away (37 tensors), because the resumed run ran the teacher live on
    epoch 2's batches where the uninterrupted run read what epoch 1's batches had cached. Made visible on every
    machine by a teacher whose outputs depend on their batch's shape: the resume refills the lost cache over
    epoch 1's batches, so it still ends bit-identical."""
    import contextlib

    from fastkd.models.capture import capture_fields as real_fields

    @contextlib.contextmanager
    def batch_dependent(model, fields):
        with real_fields(model, fields) as read:
            yield lambda out: {k: v * (1 + 1e-3 * (v.numel() % 97)) for k, v in read(out).items()}

    monkeypatch.setattr("fastkd.models.teacher.capture_fields", batch_dependent)
    a, b, lines = _memory_cache_run_killed_and_resumed(tiny, tmp_path, monkeypatch)
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    assert "resume: refilled the in-memory teacher cache over the stage's first 6 batches of epoch 1" in \
        "\n".join(lines)


def test_carried_logits_resume_is_bit_identical(tiny, tmp_path, monkeypatch):
    """Killed mid-prediction stage, which reads the logits the intermediate stage's teacher forwards kept: the
    checkpoint holds them, so the resumed run reads the values the uninterrupted run read. Without them it ran
    the teacher live on other batches; the batch-dependent teacher makes that visible on every machine."""
    import contextlib

    from fastkd.models.capture import capture_fields as real_fields

    @contextlib.contextmanager
    def batch_dependent(model, fields):
        with real_fields(model, fields) as read:
            yield lambda out: {k: v * (1 + 1e-3 * (v.numel() % 97)) for k, v in read(out).items()}

    monkeypatch.setattr("fastkd.models.teacher.capture_fields", batch_dependent)
    a, b, lines = _memory_cache_run_killed_and_resumed(tiny, tmp_path, monkeypatch, die_at=16)
    assert "teacher cache (carried) for stage prediction" in "\n".join(lines)
    assert [k for k in a if not torch.equal(a[k], b[k])] == []


def test_disk_cache_runs_repeat_bit_identically(tiny, tmp_path):
    """--cache disk gave different students on two identical runs: the first saw the live fp32 teacher, the
    second the cached fp16 values."""
    students = []
    for name in ("first", "second"):
        argv = args_for(tiny, tmp_path / name, "tinybert", "--cache", "disk", "--cache-dir", str(tmp_path / "cache"),
                        "--epochs", "2", "--set", "tinybert.pred_epochs=1")
        res = train.run(train.parse_config(argv), log=lambda *_: None)
        students.append(_student(tmp_path / name))
    assert res["cache"][0]["hit_rate"] == 1.0  # the second run read everything from the first run's shards
    assert [k for k in students[0] if not torch.equal(students[0][k], students[1][k])] == []


def test_resume_refuses_a_changed_max_length(tiny, tmp_path):
    out = tmp_path / "run"
    argv = args_for(tiny, out, "kd")
    train.run(train.parse_config(argv), log=lambda *_: None)
    argv[argv.index("--max-length") + 1] = "20"
    with pytest.raises(ValueError, match=r"max_length \(saved 24, now 20\)"):
        train.run(train.parse_config(argv + ["--resume"]), log=lambda *_: None)


# ---------------------------------------------------------------- item 5: the cached fine-tuned teacher


@pytest.mark.parametrize("damage", ["zero64k", "truncate"])
def test_a_damaged_cached_teacher_is_fine_tuned_again(tiny, tmp_path, monkeypatch, damage):
    """Zeroing 64 KiB of the cached fine-tuned teacher's weights: reused silently, exit 0. Truncating it: a
    SafetensorError traceback, never rebuilt."""
    monkeypatch.setenv("FASTKD_CACHE_DIR", str(tmp_path / "cache"))
    bare = make_teacher(tmp_path / "bare", head=False)
    argv = args_for(tiny, tmp_path / "first", "kd", "--finetune-epochs", "1")
    argv[argv.index("--teacher") + 1] = str(bare)
    first = train.run(train.parse_config(argv), log=lambda *_: None)
    cached = first["trainer"].teacher_paths["finetuned"]
    weights = cached / "model.safetensors"
    data = bytearray(weights.read_bytes())
    if damage == "zero64k":
        start = len(data) // 4
        data[start:start + 65536] = bytes(min(65536, len(data) - start))
    else:
        data = data[: len(data) // 2]
    weights.write_bytes(bytes(data))
    logs: list[str] = []
    argv[argv.index("--output-dir") + 1] = str(tmp_path / "second")
    second = train.run(train.parse_config(argv), log=logs.append)
    assert any("is not intact" in m and "fine-tuning it again" in m for m in logs), logs
    assert second["teacher_test_acc"] == first["teacher_test_acc"]  # the same seeded fine-tune, redone


# ---------------------------------------------------------------- item 6: labels


def _task_files(folder: Path, train_rows, dev_rows=None, test_rows=None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for split, rows in (("train", train_rows), ("dev", dev_rows), ("test", test_rows)):
        if rows is not None:
            (folder / f"{split}.tsv").write_text("sentence\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in rows))
    return folder


def _labelled(n: int, labels) -> list[tuple[str, str]]:
    return [(t, labels[i % len(labels)]) for i, (t, _) in enumerate(make_sentences(n, 11))]


def _run_task(tiny, tmp_path, folder: Path, *extra: str):
    argv = args_for(tiny, tmp_path / "run", "kd", *extra)
    for flag in ("--task", "--dev", "--test"):
        argv[argv.index(flag) + 1] = str(folder / f"{flag[2:].replace('task', 'train')}.tsv")
    return train.run(train.parse_config(argv), log=lambda *_: None)


def test_empty_labels_are_refused_naming_the_rows(tiny, tmp_path):
    """Empty labels became a class of their own and shifted every id: id2label {'0': '', '1': '0', '2': '1'},
    test accuracy 0.0000 with exit 0."""
    rows = _labelled(30, ["0", "1"])
    rows[4] = (rows[4][0], "")
    rows[9] = (rows[9][0], " ")
    folder = _task_files(tmp_path / "d", rows, _labelled(8, ["0", "1"]), _labelled(8, ["0", "1"]))
    with pytest.raises(ValueError, match=r"train\.tsv: 2 row\(s\) have no label \(data rows \[5, 10\]"):
        _run_task(tiny, tmp_path, folder)


def test_a_one_class_training_file_is_refused(tiny, tmp_path):
    folder = _task_files(tmp_path / "d", _labelled(30, ["pos"]), _labelled(8, ["pos"]), _labelled(8, ["pos"]))
    with pytest.raises(ValueError, match=r"training data holds a single class \('pos', 30 rows\)"):
        _run_task(tiny, tmp_path, folder)


@pytest.mark.parametrize("labels", [("neg", "pos", "neutral"), ("0", "1", "2")])
def test_a_dev_or_test_label_the_training_data_lacks_is_refused(tiny, tmp_path, labels):
    """Text labels were mapped per file in sorted order, so a test file with another label set got other ids
    silently; an unseen integer label was not caught either."""
    folder = _task_files(tmp_path / "d", _labelled(30, labels[:2]), _labelled(8, labels[:2]), _labelled(9, labels))
    with pytest.raises(ValueError, match=rf"(?=.*test\.tsv)(?=.*\b{labels[2]}\b)"):  # the file and the label
        _run_task(tiny, tmp_path, folder)


# ---------------------------------------------------------------- item 12: data and config files, named


def test_a_header_only_data_file_is_named(tiny, tmp_path):
    folder = _task_files(tmp_path / "d", [], _labelled(8, ["0", "1"]), _labelled(8, ["0", "1"]))
    with pytest.raises(ValueError, match=r"train\.tsv holds a header line \(sentence, label\) but no records"):
        _run_task(tiny, tmp_path, folder)


def test_non_utf8_bytes_name_the_file_and_line(tiny, tmp_path):
    folder = _task_files(tmp_path / "d", _labelled(20, ["0", "1"]), _labelled(8, ["0", "1"]), _labelled(8, ["0", "1"]))
    train_file = folder / "train.tsv"
    lines = train_file.read_bytes().split(b"\n")
    lines[3] = b"caf\xe9 au lait\t1"  # latin-1
    train_file.write_bytes(b"\n".join(lines))
    with pytest.raises(ValueError, match=r"train\.tsv is not UTF-8 text \(line 4, byte 4"):
        _run_task(tiny, tmp_path, folder)


@pytest.mark.parametrize("suffix,text", [(".json", '{"tinybert": {"att_weight": 2,}}'), (".yaml", "a: [1, 2")])
def test_a_malformed_config_file_is_named(tmp_path, suffix, text):
    from fastkd.config import parse_config

    f = tmp_path / f"c{suffix}"
    f.write_text(text)
    with pytest.raises(ValueError, match=rf"--config: {f} is not valid (JSON|YAML)"):
        parse_config(["--config", str(f)])


# ---------------------------------------------------------------- item 7: the teacher's tokenizer


def test_a_teacher_folder_without_its_tokenizer_is_refused(tiny, tmp_path):
    """Without tokenizer files AutoTokenizer built a 5-token vocabulary from the config: every word became [UNK]
    and the run exited 0."""
    import shutil

    from transformers import BertTokenizerFast

    folder = tmp_path / "teacher"
    shutil.copytree(tiny["teacher"], folder)
    (folder / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\n")  # another, 5-token tokenizer
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (folder / f).unlink(missing_ok=True)
    BertTokenizerFast(vocab=str(folder / "vocab.txt")).save_pretrained(folder)
    argv = args_for(tiny, tmp_path / "run", "kd")
    argv[argv.index("--teacher") + 1] = str(folder)
    with pytest.raises(ValueError, match=r"tokenizer does not match its model: the model has a 32-token vocabulary "
                                         r"and the tokenizer has 5 tokens"):
        train.run(train.parse_config(argv), log=lambda *_: None)


# ---------------------------------------------------------------- item 9: full disks


def _disk_full(path, nbytes: int = 1000):
    """What a full disk does to a writer: ``nbytes`` land in the file, then ENOSPC."""
    import errno

    Path(path).write_bytes(b"\0" * nbytes)
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_output_disk_stops_cleanly_keeping_the_last_checkpoint(tiny, tmp_path, monkeypatch):
    """A full output disk gave 'RuntimeError ... unexpected pos' and left a partial .tmp."""
    from fastkd.disk import DiskFullError
    from fastkd.training import checkpoint

    real, calls = checkpoint.torch.save, {"n": 0}

    def full_from_the_third(obj, path, *a, **k):
        calls["n"] += 1
        return real(obj, path, *a, **k) if calls["n"] < 3 else _disk_full(path)

    monkeypatch.setattr(checkpoint.torch, "save", full_from_the_third)
    out = tmp_path / "run"
    said = (r"no space left on the disk of .*checkpoints while writing step-3\.pt; the partial step-3\.pt\.tmp was "
            r"removed; the last good checkpoint, .*step-2\.pt")
    with pytest.raises(DiskFullError, match=said):
        train.run(train.parse_config(args_for(tiny, out, "kd", "--save-every", "1")), log=lambda *_: None)
    assert not list(out.rglob("*.tmp"))
    monkeypatch.setattr(checkpoint.torch, "save", real)
    logs: list[str] = []
    train.run(train.parse_config(args_for(tiny, out, "kd", "--save-every", "1", "--resume")), log=logs.append)
    assert any("resume: from" in m and "step-2.pt" in m for m in logs), logs  # the kept checkpoint is intact


def test_a_full_cache_disk_stops_before_the_epoch_checkpoint_without_tmp_shards(tiny, tmp_path, monkeypatch):
    """A full cache disk during cache.flush() lost the epoch with a traceback and left a .tmp shard."""
    from fastkd.cache import store as cache
    from fastkd.disk import DiskFullError

    monkeypatch.setattr(cache, "_write_safetensors", lambda path, tensors, metadata: _disk_full(path))
    argv = args_for(tiny, tmp_path / "run", "tinybert", "--cache", "disk", "--cache-dir", str(tmp_path / "cache"),
                    "--epochs", "2", "--set", "tinybert.pred_epochs=1")
    with pytest.raises(DiskFullError, match=r"while writing teacher-cache shard .*the run stopped before this "
                                            r"epoch's checkpoint"):
        train.run(train.parse_config(argv), log=lambda *_: None)
    assert not list((tmp_path / "cache").rglob("*.tmp"))


def test_a_full_disk_while_saving_the_student_leaves_no_partial_folder(tiny, tmp_path, monkeypatch):
    from transformers import PreTrainedModel

    from fastkd.disk import DiskFullError

    real = PreTrainedModel.save_pretrained

    def full_for_the_student(self, folder, *a, **k):
        if Path(folder).name == "student.tmp":
            Path(folder).mkdir(parents=True, exist_ok=True)
            _disk_full(Path(folder) / "model.safetensors")
        return real(self, folder, *a, **k)

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", full_for_the_student)
    out = tmp_path / "run"
    with pytest.raises(DiskFullError, match=r"while writing student/; the partial copy was removed; best/ and the "
                                            r"checkpoints .* are kept"):
        train.run(train.parse_config(args_for(tiny, out, "kd")), log=lambda *_: None)
    assert not (out / "student.tmp").exists() and not (out / "student").exists()
    assert (out / "best" / "model.safetensors").is_file() and (out / "best" / "tokenizer.json").is_file()
