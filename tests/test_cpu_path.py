"""The CPU path of issue #24: bf16 where the CPU computes it natively, the prediction stage reading the logits
the intermediate stage's teacher forwards kept (no teacher forward of its own), and --eval-every with a training
clock that leaves evaluations and checkpoints out."""

from __future__ import annotations

import ctypes
import platform
import sys

import pytest
import torch

from fastkd import device as device_mod
from fastkd.cache.carry import CarriedOutputs
from fastkd.device import release_freed_host_memory
from fastkd.models import teacher as teacher_mod
from fastkd.training import engine
from tests.train_support import args_for, read_metrics, run_cli


@pytest.mark.parametrize("native", [True, False])
def test_auto_precision_follows_native_bf16(monkeypatch, native):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    cpu = torch.device("cpu")
    assert device_mod.native_bf16(cpu) is native
    assert engine.autocast_dtype("auto", cpu) == (torch.bfloat16 if native else None)
    assert teacher_mod.teacher_dtype("auto", cpu) == (torch.bfloat16 if native else torch.float32)
    assert engine.autocast_dtype("off", cpu) is None and engine.autocast_dtype("bf16", cpu) == torch.bfloat16


def test_adamw_is_fused_by_default():
    p = torch.nn.Parameter(torch.randn(4, 3))
    opt = engine.adamw([p], 1e-3, 0.01)
    assert all(g["fused"] for g in opt.param_groups)


def _pred_losses(out):
    return [m["loss"] for m in read_metrics(out) if m.get("stage") == "prediction" and "loss" in m
            and "event" not in m]


def test_prediction_stage_reads_the_carried_logits(tiny, tmp_path):
    """TinyBERT's prediction stage runs no teacher forward: it reads the logits the intermediate stage's forwards
    kept, each example's own (a shifted index would give other losses than the live teacher's)."""
    live, carried = tmp_path / "live", tmp_path / "carried"
    common = ("--teacher-dtype", "fp32", "--amp", "off")  # exact logits: only batch composition differs
    run_cli(args_for(tiny, live, "tinybert", *common))
    res = run_cli(args_for(tiny, carried, "tinybert", *common, "--cache", "auto"))
    cache = {m["stage"]: m for m in read_metrics(carried) if m.get("event") == "cache"}
    assert cache["prediction"]["mode"] == "carried" and cache["prediction"]["teacher_forwards"] == 0
    assert cache["prediction"]["hit_rate"] == 1.0
    assert res["teacher_forwards"] == 6  # the intermediate stage's 6 batches only
    a, b = _pred_losses(live), _pred_losses(carried)
    assert len(a) == len(b) == 6
    for x, y in zip(a, b, strict=True):
        assert abs(x - y) <= 1e-5 * abs(x), (a, b)


def test_no_carry_with_the_cache_off(tiny, tmp_path):
    out = tmp_path / "off"
    res = run_cli(args_for(tiny, out, "tinybert"))  # args_for passes --cache off
    assert res["teacher_forwards"] == 12
    assert not [m for m in read_metrics(out) if m.get("event") == "cache"]


def test_carried_outputs_refuse_a_partial_batch():
    carry = CarriedOutputs(4, ["logits"], torch.float32)
    carry.put(torch.tensor([0, 2]), torch.tensor([3, 3]), {"logits": torch.tensor([[1.0, 2.0], [3.0, 4.0]])})
    assert carry.get(torch.tensor([0, 1]), torch.tensor([3, 3])) is None  # example 1 was never stored
    assert torch.equal(carry.get(torch.tensor([2, 0]), torch.tensor([3, 3]))["logits"],
                       torch.tensor([[3.0, 4.0], [1.0, 2.0]]))
    assert not carry.complete
    again = CarriedOutputs.from_state(carry.state_dict())
    assert torch.equal(again.rows["logits"], carry.rows["logits"]) and again.stats["examples"] == 2


def test_eval_every_records_training_time_without_evaluations(tiny, tmp_path):
    out = tmp_path / "run"
    run_cli(args_for(tiny, out, "tinybert", "--eval-every", "4"))
    evals = [m for m in read_metrics(out) if m.get("event") == "eval"]
    # 6 steps per stage, 12 in all: step 4 and 8 on the schedule, 6 and 12 at the stages' ends
    assert [e["step"] for e in evals] == [4, 6, 8, 12]
    assert [e["stage"] for e in evals] == ["intermediate", "intermediate", "prediction", "prediction"]
    times = [e["train_s"] for e in evals]
    assert times == sorted(times) and all(e["eval_s"] > 0 and "dev_acc" in e for e in evals)


def test_stopwatch_leaves_paused_time_out(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(engine.time, "perf_counter", lambda: now[0])
    clock = engine.Stopwatch()
    now[0] = 103.0
    with clock.paused():
        now[0] = 110.0
        with clock.paused():  # nested: counted once
            now[0] = 111.0
    now[0] = 112.0
    assert clock.train_s == pytest.approx(4.0)  # 12 s since the start, 8 of them paused


def test_a_step_checkpoint_holds_the_best_its_own_evaluation_chose(tiny, tmp_path):
    """--eval-every and --save-every on the same step: the evaluation runs first, so a run resumed from that
    checkpoint knows the best student it chose (the other order lost it)."""
    out = tmp_path / "run"
    run_cli(args_for(tiny, out, "tinybert", "--eval-every", "2", "--save-every", "2", "--keep-checkpoints", "20"))
    saved = torch.load(out / "checkpoints" / "step-8.pt", weights_only=False)  # mid-prediction stage (steps 7-12)
    assert saved["best"] is not None and saved["best"]["step"] == 8


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                    reason="malloc_trim is glibc's")
def test_freed_heap_memory_goes_back_to_the_os():
    """Chunks below the mmap threshold come from the heap and stay there once freed; the release hands the free
    top of the heap back (malloc_trim reports it did). Without a call, nothing would be returned."""
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    chunks = [libc.malloc(64 * 1024) for _ in range(2000)]  # 125 MiB of heap chunks
    for c in chunks:
        libc.free(c)
    assert release_freed_host_memory() is True
