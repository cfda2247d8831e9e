"""bench/summarize.py: the trainer verdict compares the full configuration with the eager fp32 baseline."""

from __future__ import annotations

from bench.summarize import summarize


def _case(backend, teacher, amp, ms):
    return {"case": "trainer_tinybert_intermediate_step", "median_ms": ms, "peak_mem_mib": 100.0,
            "params": {"backend": backend, "teacher": teacher, "batch": 32, "length": 128, "amp": amp}}


def _data(full_ms):
    return {"environment": {"device": "test"}, "cases": [
        _case("eager", "fp32", "off", 100.0), _case("eager", "fp32", "bfloat16", 70.0),
        _case("fused", "cached", "bfloat16", full_ms)]}


def test_trainer_verdict_met_and_missed():
    met = summarize(_data(40.0))
    assert "host cache 2.50× the baseline at batch 32; target ≥ 2×: met (host cache)" in met
    assert "| eager | fp32 | bfloat16 | 457.1 | 1.43× |" in met  # 32 / 70 ms; 100 / 70
    assert "target ≥ 2×: missed (host cache)" in summarize(_data(60.0))


def test_trainer_verdict_names_the_faster_cache():
    data = _data(60.0)
    data["cases"].append(_case("fused", "device", "bfloat16", 45.0))
    text = summarize(data)
    assert "host cache 1.67×, device cache 2.22× the baseline at batch 32; target ≥ 2×: met (device cache)" in text


def test_no_verdict_without_the_baseline():
    data = _data(40.0)
    data["cases"] = data["cases"][1:]
    assert "Trainer throughput" not in summarize(data)
