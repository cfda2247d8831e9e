"""Turn a benchmark results JSON (written by bench/conftest.py) into a markdown table.

    python bench/summarize.py bench/results/nvidia-h100-80gb-hbm3-2025-01-01.json [--baseline impl=eager]
        [--case sinkhorn] [-o table.md]

One row per case; ``--baseline KEY=VALUE`` adds a "speedup" column: the time of the row whose params are the
same except ``KEY == VALUE``, divided by this row's time.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

COLUMNS = [
    ("case", "case"),
    ("params", "params"),
    ("median_ms", "median ms"),
    ("peak_mem_mib", "peak MiB"),
    ("gbps", "GB/s"),
    ("pct_copy_bw", "% copy BW"),
    ("tflops", "TFLOP/s"),
    ("power_w", "W"),
    ("energy_mj_per_call", "mJ/call"),
    ("status", "status"),
]


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        if v == 0:
            return "0"
        if abs(v) >= 100:
            return f"{v:,.0f}"
        if abs(v) >= 1:
            return f"{v:.2f}"
        return f"{v:.3g}"
    if isinstance(v, dict):
        return ", ".join(f"{k}={_fmt(x)}" for k, x in v.items())
    return str(v).replace("|", "\\|")


def _key_without(params: dict[str, Any], key: str) -> str:
    return json.dumps({k: v for k, v in params.items() if k != key}, sort_keys=True)


def summarize(data: dict[str, Any], baseline: str | None = None, case_filter: str | None = None) -> str:
    env = data.get("environment", {})
    cases = [c for c in data.get("cases", []) if not case_filter or case_filter in c.get("case", "")]
    lines = [
        f"**{env.get('device', '?')}** (driver {env.get('driver') or '–'}), torch {env.get('torch')}, "
        f"triton {env.get('triton')}, transformers {env.get('transformers')}, commit "
        f"`{(env.get('git_commit') or '?')[:12]}`, {env.get('date', '?')}",
        "",
    ]
    cols = list(COLUMNS)
    # Drop columns that are empty for every case (e.g. power on the CPU).
    cols = [(k, h) for k, h in cols if k in ("case", "params", "status") or any(c.get(k) is not None for c in cases)]
    base_times: dict[tuple[str, str], float] = {}
    bkey = bval = None
    if baseline:
        bkey, _, bval = baseline.partition("=")
        for c in cases:
            p = c.get("params", {})
            if str(p.get(bkey)) == bval and c.get("median_ms"):
                base_times[(c["case"], _key_without(p, bkey))] = c["median_ms"]
        cols.insert(3, ("speedup", f"speedup vs {bkey}={bval}"))
    lines.append("| " + " | ".join(h for _, h in cols) + " |")
    lines.append("|" + "|".join("---" for _ in cols) + "|")
    for c in cases:
        row = []
        for k, _ in cols:
            if k == "speedup":
                t0 = base_times.get((c["case"], _key_without(c.get("params", {}), bkey)))
                row.append(f"{t0 / c['median_ms']:.1f}×" if t0 and c.get("median_ms") else "–")
            else:
                row.append(_fmt(c.get(k)))
        lines.append("| " + " | ".join(row) + " |")
    lines += trainer_summary(cases)
    return "\n".join(lines) + "\n"


TRAINER_CASE = "trainer_tinybert_intermediate_step"
TRAINER_TARGET = 2.0  # the full fastkd configuration vs the eager fp32 live-teacher baseline, same batch size


def trainer_summary(cases: list[dict[str, Any]]) -> list[str]:
    """Samples/s of each trainer case relative to the eager fp32 baseline (eager losses, fp32 live teacher, AMP
    off), and whether the full configuration (fused losses, cached teacher -- host or device cache --, AMP) meets
    the target."""
    rows = [c for c in cases if c.get("case") == TRAINER_CASE and c.get("median_ms")]
    base = next((c for c in rows if c["params"].get("backend") == "eager" and c["params"].get("teacher") == "fp32"
                 and c["params"].get("amp") == "off"), None)
    if not rows or base is None:
        return []
    out = ["", "Trainer throughput (TinyBERT intermediate step; baseline: eager losses, fp32 live teacher, AMP off):",
           "", "| losses | teacher | AMP | samples/s | × baseline | peak MiB |", "|---|---|---|---|---|---|"]
    for c in rows:
        p = c["params"]
        out.append(f"| {p.get('backend')} | {p.get('teacher')} | {p.get('amp')} | "
                   f"{p['batch'] * 1e3 / c['median_ms']:,.1f} | {base['median_ms'] / c['median_ms']:.2f}× | "
                   f"{_fmt(c.get('peak_mem_mib'))} |")
    # The full configuration: fused losses, a cached teacher (host cache "cached", or "device"), AMP on.
    full = {c["params"]["teacher"]: c for c in rows if c["params"].get("backend") == "fused"
            and c["params"].get("teacher") in ("cached", "device") and c["params"].get("amp") != "off"}
    if full:
        ratios = {kind: base["median_ms"] / c["median_ms"] for kind, c in full.items()}
        best = max(ratios, key=ratios.get)
        names = {"cached": "host cache", "device": "device cache"}
        listed = ", ".join(f"{names[k]} {r:.2f}×" for k, r in sorted(ratios.items()))
        out += ["", f"Full fastkd configuration (fused losses, cached teacher, AMP): {listed} the baseline at batch "
                    f"{full[best]['params']['batch']}; target ≥ {TRAINER_TARGET:g}×: "
                    f"{'met' if ratios[best] >= TRAINER_TARGET else 'missed'} ({names[best]})."]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", type=Path, help="a results JSON from bench/results/ (or a folder of them)")
    ap.add_argument("--baseline", help="KEY=VALUE: add a speedup column relative to the row with params[KEY]=VALUE")
    ap.add_argument("--case", help="only cases whose name contains this")
    ap.add_argument("-o", "--output", type=Path, help="write the table here instead of stdout")
    args = ap.parse_args(argv)
    files = sorted(args.results.glob("*.json")) if args.results.is_dir() else [args.results]
    if not files:
        ap.error(f"results: no *.json in {args.results}")
    table = "\n".join(summarize(json.loads(f.read_text()), args.baseline, args.case) for f in files)
    if args.output:
        args.output.write_text(table)
    else:
        sys.stdout.write(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
