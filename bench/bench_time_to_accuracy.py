"""The time-to-accuracy benchmark (bench/time_to_accuracy.py) under pytest: ``pytest bench/ --benchmark-only``
runs the short side-by-side case (SST-2, 3x384, 1,000 examples: a few minutes on a 2-core CPU) and writes
``bench/results/time-to-accuracy-<device>-short.{json,md}``; ``--tta-full`` runs the full table instead. It
skips, saying why, without the peers (``pip install -e '.[peers]'``)."""

from __future__ import annotations

import pytest


def test_time_to_accuracy(benchmark, request):
    pytest.importorskip("textbrewer", reason="TextBrewer is an optional peer: pip install -e '.[peers]'")
    from bench import time_to_accuracy

    argv = ["--full"] if request.config.getoption("--tta-full") else []
    result = benchmark.pedantic(time_to_accuracy.main, args=(argv,), rounds=1, iterations=1)
    for case in result["cases"]:
        check = case.get("loss_check")
        # The comparison is of one job only if fastkd and TextBrewer compute the same losses on the same batches.
        assert check is None or check["equal"], f"losses differ: {check['max_rel_diff_fp32']:.2e}"
        assert set(case["summary"]) >= {"fastkd", "textbrewer-etd"}
        benchmark.extra_info[f"{case['task']}-{case['width']}"] = {
            name: {k: r[k] for k in ("samples_per_s", "time_to_97pct_s", "best_dev_acc", "peak_rss_mib")}
            for name, r in case["summary"].items()}
