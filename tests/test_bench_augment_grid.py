"""bench/augment_grid.py: docs/augmentation.md's table from recorded runs (seeds averaged per configuration, a
lever row kept apart from the row it varies, rows not run or run with another command shown as not run)."""

from __future__ import annotations

import json
import shlex

import pytest

from bench import augment_grid as grid


def _record(root, row, student, teacher=0.88, command=None, metrics=()):
    d = root / row.name
    d.mkdir(parents=True)
    meta = {"command": command or shlex.join(row.argv()), "commit": "abc1234", "wall_s": 100.0}
    (d / "meta.json").write_text(json.dumps(meta))
    (d / "result.json").write_text(json.dumps({"student_test_acc": student, "teacher_test_acc": teacher}))
    (d / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    (d / "log.txt").write_text("stage 1/2 intermediate: 1 epoch(s) x 392 steps, 12522 examples (augmented data)\n")


@pytest.fixture
def results(tmp_path, monkeypatch):
    monkeypatch.setattr(grid, "RESULTS", tmp_path)
    return tmp_path


def _line(text, *cells):
    return next(x for x in text.splitlines() if x.startswith("| " + " | ".join(cells) + " |"))


def test_seeds_average_and_levers_stay_apart(results):
    row = grid.AugRow
    _record(results, row("sst2", "384", 0, 0), 0.80)
    _record(results, row("sst2", "384", 0, 1), 0.82)
    _record(results, row("sst2", "384", grid.COPIES, 0), 0.836)
    _record(results, row("sst2", "384", grid.COPIES, 0, epochs=(3,)), 0.8544)  # same N, another label
    text = grid.table()
    none = _line(text, "sst2", "3×384", "none")
    assert "| 0,1 |" in none and "0.8100 ± 0.0141" in none and "92.0%" in none and "no, 5.0 pt short" in none
    assert "| 0 |" in _line(text, "sst2", "3×384", f"N={grid.COPIES}") and "95.0%" in text
    lever = _line(text, "sst2", "3×384", f"N={grid.COPIES}, 3 epochs")
    assert "0.8544 |" in lever and "97.1%" in lever and "| yes |" in lever and "12,522" in lever
    assert "not run yet" in _line(text, "sst2", "3×192", "none")
    assert "Best: N=4, 3 epochs, 97.1% (one seed only) against the goal of 97.0%: met." in text
    # a lever's gain is against no augmentation on its own seeds (seed 0: 90.9%), not the mean over seeds 0-1
    assert "without augmentation 92.0% of the teacher (seeds 0,1)" in text
    assert "N=4, 3 epochs: +6.2 pt (seed 0)" in text and "N=4: +4.1 pt (seed 0)" in text


def test_a_row_recorded_with_another_command_is_not_counted(results):
    row = grid.AugRow("agnews", "192", 0, 0)
    _record(results, row, 0.75, command=shlex.join(row.argv()) + " --epochs 2")
    assert not grid.is_current_aug(row)
    assert "not run yet" in _line(grid.table(), "agnews", "3×192", "none")


def test_cache_line_compares_the_first_epoch_with_the_cached_ones(results):
    evals = [{"stage": "intermediate", "epoch": e, "event": "eval", "train_s": t} for e, t in enumerate((90, 150, 210))]
    cache = {"stage": "intermediate", "event": "cache", "mode": "memory", "bytes": 2**30, "teacher_forwards": 392}
    _record(results, grid.AugRow("sst2", "192", grid.COPIES, 0, epochs=(3,)), 0.80, metrics=[*evals, cache])
    _record(results, grid.AugRow("sst2", "192", grid.COPIES, 0), 0.79, metrics=[evals[0], cache])  # one epoch: none
    lines = [x for x in grid.table().splitlines() if "intermediate-stage epoch 1" in x]
    assert len(lines) == 1 and "N=4, 3 epochs" in lines[0]
    assert "epoch 1 90 s" in lines[0] and "epochs 2-3 60 s each" in lines[0] and "1.50× faster" in lines[0]
    assert "memory cache: 1,024 MiB" in lines[0] and "392 teacher forwards in 3 epochs" in lines[0]
