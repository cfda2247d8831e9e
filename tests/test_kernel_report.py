"""The static sm_90 report's regression gate: BERT-shaped half-precision launches compile with no register
spill, and at 2 CTAs/SM or more unless bench/kernel_report.py gives the kernel a written reason."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import kernel_report  # noqa: E402


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    missing = kernel_report.tools_available()
    if missing:
        pytest.skip(f"no sm_90 compile here: {missing}")
    out = tmp_path_factory.mktemp("report") / "quick.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # real JIT kernels, compiled only
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "kernel_report.py"), "--quick", "--json", str(out)],
                          env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def rows(report):
    return report["rows"]


def test_every_fused_loss_was_compiled(rows):
    kernels = {r["kernel"] for r in rows}
    assert {"_attention_mse_gram_fwd_kernel", "_attention_mse_gram_bwd_kernel", "_attention_kl_fwd",
            "_attention_kl_bwd_dk", "_hidden_mse_fwd_kernel"} <= kernels
    assert all(r["registers"] > 0 and r["spill_stores"] is not None for r in rows)


def test_no_spill_in_half_precision_kernels(rows):
    spilling = [f"{r['case']}: {r['kernel']} {r['spill_stores']}/{r['spill_loads']} B" for r in rows
                if r["dtype"] in ("fp16", "bf16") and (r["spill_stores"] or r["spill_loads"])]
    assert not spilling


def test_two_ctas_per_sm_or_a_written_reason(rows):
    low = [f"{r['case']}: {r['kernel']} {r['ctas_per_sm']} CTA/SM (limited by {r['limited_by']})" for r in rows
           if r["ctas_per_sm"] < 2 and not kernel_report.low_occupancy_reason(r)]
    assert not low


def test_half_precision_attention_backward_uses_tensor_cores(rows):
    bwd = [r for r in rows if r["kernel"] == "_attention_mse_gram_bwd_kernel" and r["dtype"] in ("fp16", "bf16")]
    assert bwd and all(r["mma"] in ("HGMMA", "HMMA") for r in bwd)


def test_occupancy_arithmetic():
    assert kernel_report.occupancy(128, 8, 48 * 1024)["ctas_per_sm"] == 2  # 128 regs x 256 threads: 2 fit
    assert kernel_report.occupancy(129, 8, 0) == {"ctas_per_sm": 1, "occupancy": 0.125, "limited_by": "registers"}
    assert kernel_report.occupancy(32, 4, 100 * 1024)["limited_by"] == "shared"


# The targets at L = 512 (bf16, mixed-length masks), read off the roofline estimate of the kernels as
# compiled: a kernel change that adds enough instructions, MMAs or traffic to miss one fails here.
SPEEDUP_TARGETS = {"attention_kl": 10.0, "attention_mse": 10.0, "hidden_mse": 1.5}


def test_estimated_speedups_meet_the_targets(report):
    estimates = {e["loss"]: e for e in report["roofline"] if e["L"] == 512 and e["masked"]}
    assert set(estimates) == set(SPEEDUP_TARGETS)
    short = [f"{loss}: {estimates[loss][gpu]['speedup']:.1f}x on {gpu} < {target}x"
             for loss, target in SPEEDUP_TARGETS.items() for gpu in ("H100 SXM", "H200")
             if estimates[loss][gpu]["speedup"] < target]
    assert not short



def test_autotune_spaces_start_from_the_reports_launches(rows):
    from fastkd.kernels import _common, attention_kl, attention_mse, hidden_mse

    space = _common.config_space(dict(BLOCK_M=64, num_warps=4, num_stages=2), BLOCK_M=(64, 128), num_warps=(4, 8))
    assert [(c.kwargs["BLOCK_M"], c.num_warps) for c in space] == [(64, 4), (64, 8), (128, 4), (128, 8)]
    tunables = {"_attention_kl_fwd": attention_kl._FORWARD, "_attention_kl_bwd_dk": attention_kl._DK_BACKWARD,
                "_attention_mse_gram_fwd_kernel": attention_mse._GRAM_FORWARD,
                "_attention_mse_gram_bwd_kernel": attention_mse._GRAM_BACKWARD,
                "_hidden_mse_fwd_kernel": hidden_mse._FORWARD}
    for kernel, t in tunables.items():
        keys = [(tuple(sorted(c.kwargs.items())), c.num_warps, c.num_stages) for c in t.space]
        assert len(keys) == len(set(keys)) and 2 <= len(keys) <= 24
        # The first entry is the launch the report compiled for the BERT-shaped bf16 case.
        launch = next(r for r in rows if r["kernel"] == kernel and r["dtype"] == "bf16" and r["d"] in (64, 384))
        first = t.space[0]
        assert (first.num_warps, first.num_stages) == (launch["num_warps"], launch["num_stages"]), kernel
        assert all(launch["constexprs"][k] == v for k, v in first.kwargs.items()), kernel


def test_autotune_is_off_by_default_and_under_the_interpreter(monkeypatch):
    from fastkd.kernels import _common

    monkeypatch.delenv("FASTKD_AUTOTUNE", raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not _common.autotune_enabled()
    monkeypatch.setenv("FASTKD_AUTOTUNE", "1")
    assert _common.autotune_enabled()
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not _common.autotune_enabled()
