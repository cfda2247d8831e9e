"""Crash recovery: kill -9 a training subprocess mid-epoch after a checkpoint, resume it, and end with exactly the
weights and metrics of an uninterrupted run with the same seed (tiny random BERT, tiny local TSVs)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.helpers import make_teacher, write_task

REPO = Path(__file__).resolve().parents[1]


def _argv(teacher: Path, data: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "tests.slow_train", "--method", "tinybert", "--teacher", str(teacher),
            "--task", str(data / "train.tsv"), "--dev", str(data / "dev.tsv"), "--test", str(data / "test.tsv"),
            "--output-dir", str(out), "--student-layers", "2", "--student-hidden", "32", "--student-heads", "4",
            "--student-ffn", "64", "--batch-size", "8", "--epochs", "2", "--set", "tinybert.pred_epochs=1",
            "--save-every", "4", "--log-every", "1", "--latency-runs", "1", "--no-progress", "--cache", "off",
            "--max-length", "24", "--seed", "7"]


def _env(delay: float) -> dict:
    # The checkout first, then whatever the caller had on PYTHONPATH (e.g. wheels installed with --target).
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return dict(os.environ, FASTKD_TEST_STEP_DELAY=str(delay), OMP_NUM_THREADS="1", PYTHONPATH=path)


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")


def _metrics(out: Path) -> list[dict]:
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    drop = {"samples_per_s", "wall_s", "teacher_latency_ms", "student_latency_ms", "speedup", "speedup_p10",
            "speedup_p90", "output_dir",
            "student_dir", "teacher_forwards",  # forwards: the resumed process counts its own
            "train_s", "eval_s"}  # times
    return [{k: v for k, v in r.items() if k not in drop} for r in recs]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    # Dropout on, so the restored RNG state matters for an exact resume.
    teacher = make_teacher(root / "teacher", hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    return teacher, write_task(root / "data"), root


def test_kill9_mid_epoch_then_resume_matches_uninterrupted(setup):
    teacher, data, root = setup
    ref_out, crash_out = root / "uninterrupted", root / "crashed"
    ref = subprocess.run(_argv(teacher, data, ref_out), env=_env(0), cwd=REPO, timeout=300, capture_output=True,
                         text=True)
    assert ref.returncode == 0, ref.stderr[-3000:]

    # 48 examples / batch 8 = 6 steps per epoch; a checkpoint every 4 steps: step 4 is mid-epoch 1.
    proc = subprocess.Popen(_argv(teacher, data, crash_out), env=_env(1.0), cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    ckpt = crash_out / "checkpoints" / "step-4.pt"
    deadline = time.time() + 240
    while not ckpt.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert ckpt.exists(), "the run wrote no step-4 checkpoint"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert not (crash_out / "student").exists()  # it really died before finishing
    saved = torch.load(ckpt, weights_only=False)
    assert saved["sampler"]["batches_done"] == 4 and saved["epoch"] == 0 and saved["stage"] == 0

    # Same command + --resume continues from the newest checkpoint.
    res = subprocess.run(_argv(teacher, data, crash_out) + ["--resume"], env=_env(0), cwd=REPO, timeout=300,
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resume: from" in res.stdout

    a, b = _weights(ref_out / "student"), _weights(crash_out / "student")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert _metrics(ref_out) == _metrics(crash_out)
    ra = json.loads((ref_out / "result.json").read_text())
    rb = json.loads((crash_out / "result.json").read_text())
    assert ra["student_test_acc"] == rb["student_test_acc"] and ra["best"] == rb["best"]


def test_resume_refuses_a_different_run(setup, tmp_path):
    teacher, data, _ = setup
    out = tmp_path / "run"
    out.mkdir()
    (out / "run.json").write_text(json.dumps({"identity": {"method": "kd"}, "started": "x"}))
    res = subprocess.run(_argv(teacher, data, out) + ["--resume"], env=_env(0), cwd=REPO, timeout=300,
                         capture_output=True, text=True)
    assert res.returncode == 2
    assert "holds a different run" in res.stderr and "method (saved 'kd', now 'tinybert')" in res.stderr
