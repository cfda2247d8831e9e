"""Observability: --report-to (TensorBoard read back, a missing tracker refused before training), loss.png for
short runs and with the dev accuracy, and the speed-up as a median with its spread."""

from __future__ import annotations

import sys

import pytest

from tests.train_support import args_for, read_metrics, run_cli


def test_tensorboard_event_file_written_and_read_back(tiny, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    res = run_cli(args_for(tiny, tmp_path / "out", "tinybert", "--report-to", "tensorboard"))
    events = list((tmp_path / "out" / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1
    acc = EventAccumulator(str(events[0]))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/intermediate/loss_att_mse", "train/intermediate/loss_hidden_mse", "train/prediction/loss_soft_ce",
            "eval/prediction/dev_acc", "final/speedup", "final/student_test_acc"} <= tags
    logged = [r for r in read_metrics(tmp_path / "out") if "loss_att_mse" in r]
    got = acc.Scalars("train/intermediate/loss_att_mse")
    assert [e.step for e in got] == [r["step"] for r in logged]
    assert [e.value for e in got] == pytest.approx([r["loss_att_mse"] for r in logged], rel=1e-6)
    assert acc.Scalars("final/speedup")[0].value == pytest.approx(res["speedup"], rel=1e-6)


def test_report_to_a_missing_tracker_fails_before_training(tiny, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError, installed or not
    with pytest.raises(ValueError, match="--report-to wandb: the 'wandb' package is not installed; pip install wandb"):
        run_cli(args_for(tiny, tmp_path / "out", "kd", "--report-to", "wandb"))
    assert not (tmp_path / "out" / "metrics.jsonl").exists()
    with pytest.raises(ValueError, match="--report-to: expected none or a comma-separated list of tensorboard"):
        run_cli(args_for(tiny, tmp_path / "out2", "kd", "--report-to", "mlflow"))


def test_loss_plot_draws_short_runs_and_dev_accuracy(tiny, tmp_path):
    """4 steps at --log-every 10 once gave blank axes: one point per stage and no marker."""
    from fastkd.training.report import loss_figure

    run_cli(args_for(tiny, tmp_path / "out", "tinybert", "--log-every", "10"))
    recs = read_metrics(tmp_path / "out")
    steps = [r["stage"] for r in recs if "loss" in r and "event" not in r]
    assert steps.count("intermediate") == 1  # 6 steps at --log-every 10: the stage's last step only
    assert (tmp_path / "out" / "loss.png").stat().st_size > 0
    fig = loss_figure(recs)
    loss_ax, acc_ax = fig.axes
    drawn = [ln for ln in loss_ax.get_lines() if ln.get_label().startswith("loss")]
    assert drawn and all(ln.get_marker() not in (None, "None", "") for ln in drawn)
    dev = [r["dev_acc"] for r in recs if r.get("event") == "eval"]
    assert list(acc_ax.get_lines()[0].get_ydata()) == dev
    # The dev accuracy is named on its own axis, not in the losses' legend.
    assert not any("dev" in t.get_text() for t in loss_ax.get_legend().get_texts())
    assert "dev accuracy" in acc_ax.get_ylabel()


def test_loss_plot_names_the_stages_and_joins_no_two(tiny, tmp_path):
    # The total loss was one line across stages: it drew a drop (4.5 -> 0.45) that no step made.
    from fastkd.training.report import loss_figure

    run_cli(args_for(tiny, tmp_path / "out", "tinybert", "--epochs", "2"))
    recs = [r for r in read_metrics(tmp_path / "out") if "loss" in r and "event" not in r]
    fig = loss_figure(read_metrics(tmp_path / "out"))
    loss_ax = fig.axes[0]
    spans = {st: {r["step"] for r in recs if r["stage"] == st} for st in ("intermediate", "prediction")}
    lines = loss_ax.get_lines()
    assert [ln for ln in lines if ln.get_label() == "loss"]
    for ln in lines:
        xs = set(ln.get_xdata())
        assert any(xs <= span for span in spans.values()), f"{ln.get_label()} crosses a stage boundary: {xs}"
    assert {"intermediate", "prediction"} <= {t.get_text() for t in loss_ax.texts}


def test_speedup_is_a_median_with_its_spread(tiny, tmp_path):
    from fastkd.training.report import speedup_summary

    res = run_cli(args_for(tiny, tmp_path / "out", "kd", "--latency-runs", "5"))
    assert res["latency_runs"] == 5
    # The headline is the ratio of the two medians printed beside it (it once read 1.87x beside 386.8 / 272.7 ms).
    assert res["speedup"] == pytest.approx(res["teacher_latency_ms"] / res["student_latency_ms"], rel=1e-9)
    assert res["speedup_p10"] <= res["speedup_p90"]
    s = speedup_summary([10.0, 10.0, 10.0, 50.0], [5.0, 5.0, 5.0, 1.0])  # one loaded pair does not move it
    assert s["speedup"] == 2.0 and s["speedup_p90"] > 2.0
