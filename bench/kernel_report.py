"""Static sm_90 report of every fused kernel exactly as ``fastkd.losses`` launches it, without a GPU.

    python bench/kernel_report.py                    # the full grid; writes bench/results/kernel-report-sm90-*
    python bench/kernel_report.py --quick --json F   # a few BERT-shaped cases (the regression test's)

How: a stub Triton driver reports an sm_90 target (``GPUTarget("cuda", 90, 32)``), and every ``kernel[grid](...)``
that the real autograd Functions make becomes a warm-up compile (``JITFunction.run(..., warmup=True)``): the
kernels see real strides, constexprs and divisibility specialisations, and are compiled to a cubin, never run.
Tensors stay on the CPU and are never read, so their values do not matter. Per launch: the grid, warps, stages,
registers and stack (``cuobjdump -res-usage``), spill stores/loads (``ptxas -v`` on the kernel's PTX), shared
memory, CTAs/SM and occupancy against H100 limits, waves over 132 SMs, the MMA kind and the instruction mix of the
innermost SASS loop (``cuobjdump -sass``). Everything here is read off compiled code: no timing, no numerics.

Must run without ``TRITON_INTERPRET`` (the kernels are then real JIT functions); the script clears it itself.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import math
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"

# H100 SXM per-SM limits (the H200 has the same SM).
SM_COUNT = 132
REGS_PER_SM = 65536
SMEM_PER_SM = 228 * 1024
SMEM_RESERVED_PER_CTA = 1024  # the driver keeps 1 KB of shared memory per CTA
MAX_WARPS_PER_SM = 64
MAX_CTAS_PER_SM = 32
REG_ALLOC_UNIT = 256  # registers per warp are allocated in units of 256

# Kernels that may run under 2 CTAs/SM, and why (the regression test accepts these and only these); a key
# "kernel@dtype" covers that input dtype only.
LOW_OCCUPANCY_REASONS: dict[str, str] = {
    "_attention_kl_bwd_dk@fp32": "fp32 inputs at d = 64: the 3xTF32 products stage hi/lo copies of the [64, 64] "
                                 "fp32 Q and K tiles in shared memory (128.5 KB a CTA), so one CTA per SM; fp32 "
                                 "is the slow path anyway (docs/kernels.md), half precision runs 2 CTAs/SM",
    "_sinkhorn_kernel": "one CTA per transport problem (P = 2 per step): a handful of CTAs in all, occupancy "
                        "is not what bounds it",
    "_attention_mse_gram_fwd_kernel": "one CTA per (batch, head) holds its six d x d fp32 Gram accumulators "
                                      "(96 KB at d = 64) in registers: 138-144 a thread at 8 warps, so one CTA per "
                                      "SM; capped at 128 (two CTAs) it spills 8-12 B under Triton 3.6, and 0 spills "
                                      "is the firmer target. It is O(L d^2) and reads Q and K once (a stream), "
                                      "with 8 warps of wgmma in flight per SM",
}




def low_occupancy_reason(row: dict) -> str | None:
    return LOW_OCCUPANCY_REASONS.get(f"{row['kernel']}@{row['dtype']}") or LOW_OCCUPANCY_REASONS.get(row["kernel"])


# ---------------------------------------------------------------- compiling without a GPU


@dataclass
class Launch:
    kernel: str
    grid: tuple[int, ...]
    num_warps: int
    num_stages: int
    shared: int
    constexprs: dict
    compiled: object = field(repr=False)


class _StubDriver:
    """Just enough of a Triton driver for compilation: an sm_90 target and device/stream ids."""

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", 90, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        import torch

        return torch.device("cpu")

    def is_active(self):
        return True


@contextlib.contextmanager
def compiling_launches():
    """Inside, every Triton launch compiles for sm_90 and is recorded instead of run; yields the record list."""
    os.environ.pop("TRITON_INTERPRET", None)
    from triton.runtime.jit import JITFunction

    config = importlib.import_module("triton.runtime.driver").driver
    original = JITFunction.run
    launches: list[Launch] = []

    def run(self, *args, grid, warmup, **kwargs):
        kernel = original(self, *args, grid=grid, warmup=True, **kwargs)
        md = kernel.metadata
        params = [p.name for p in self.params]
        bound = dict(zip(params, args, strict=False)) | kwargs
        constexprs = {p.name: bound.get(p.name) for p in self.params if p.is_constexpr}
        launches.append(Launch(self.fn.__name__, tuple(int(g) for g in (grid if isinstance(grid, tuple) else
                                                                         (grid,))),
                               md.num_warps, md.num_stages, md.shared,
                               {k: v for k, v in constexprs.items() if isinstance(v, (int, bool, str, float))},
                               kernel))
        return kernel

    previous = config._active  # None on a machine without a GPU: creating the default driver there fails
    config.set_active(_StubDriver())
    JITFunction.run = run
    try:
        yield launches
    finally:
        JITFunction.run = original
        config._active = previous


# ---------------------------------------------------------------- reading the compiled code


def _tools() -> tuple[str, str]:
    import triton
    from triton.backends.nvidia.compiler import get_ptxas

    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return get_ptxas(90).path, str(cuobjdump)


def tools_available() -> str | None:
    """None when ptxas and cuobjdump are there, else what is missing."""
    try:
        ptxas, cuobjdump = _tools()
    except Exception as e:  # noqa: BLE001 - no triton, no nvidia backend
        return f"triton's nvidia backend is missing ({e})"
    missing = [p for p in (ptxas, cuobjdump) if not Path(p).is_file()]
    return f"missing {', '.join(missing)}" if missing else None


SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")
CLASSES = {"mma": ("HGMMA", "HMMA", "IMMA"), "mufu": ("MUFU",), "fp32": ("FFMA", "FADD", "FMUL", "FMNMX", "FSEL"),
           "global": ("LDG", "STG", "LDGSTS", "RED", "ATOM", "UTMALDG"), "shared": ("LDS", "STS", "LDSM", "STSM"),
           "local": ("LDL", "STL"), "sync": ("BAR", "WARPGROUP", "WARPSYNC", "SYNCS")}


def _classify(op: str) -> str:
    base = op.split(".")[0]
    return next((c for c, names in CLASSES.items() if base in names), "other")


def sass_summary(sass: str) -> dict:
    """MMA kind and counts over the whole kernel, and the instruction mix of its innermost loop (the backward
    branch spanning the fewest instructions among those holding the most MMAs, else the longest such loop)."""
    instrs = [(int(a, 16), op, rest) for a, op, rest in SASS_LINE.findall(sass)]
    ops = [op for _, op, _ in instrs]
    kind = "HGMMA" if any(o.startswith("HGMMA") for o in ops) else "HMMA" if any(o.startswith("HMMA") for o in ops) \
        else "none"
    loops = []
    for i, (addr, op, rest) in enumerate(instrs):
        m = re.search(r"0x([0-9a-f]+)", rest) if op.startswith("BRA") else None
        if m and int(m.group(1), 16) < addr:
            start = next(j for j, x in enumerate(instrs) if x[0] >= int(m.group(1), 16))
            loops.append((start, i))
    innermost = [lp for lp in loops if not any(o != lp and lp[0] <= o[0] and o[1] <= lp[1] for o in loops)]
    body: list[str] = []
    if innermost:
        def mmas(lp):
            return sum(_classify(o) == "mma" for _, o, _ in instrs[lp[0]:lp[1] + 1])
        best = max(innermost, key=lambda lp: (mmas(lp), lp[1] - lp[0]))
        body = [o for _, o, _ in instrs[best[0]:best[1] + 1]]
    mix: dict[str, int] = {}
    for o in body:
        mix[_classify(o)] = mix.get(_classify(o), 0) + 1
    return {"mma": kind, "mma_total": sum(_classify(o) == "mma" for o in ops), "instructions": len(ops),
            "mufu_total": sum(_classify(o) == "mufu" for o in ops), "loops": len(loops),
            "inner_loop": {"instructions": len(body), **dict(sorted(mix.items()))}}


def resources(compiled, workdir: Path) -> dict:
    """Registers, stack and local memory of the cubin; spill bytes from ptxas on the same PTX; the SASS summary."""
    ptxas, cuobjdump = _tools()
    name = compiled.metadata.name
    cubin, ptx = workdir / f"{name}.cubin", workdir / f"{name}.ptx"
    cubin.write_bytes(compiled.asm["cubin"])
    ptx.write_text(compiled.asm["ptx"])
    usage = subprocess.run([cuobjdump, "-res-usage", str(cubin)], capture_output=True, text=True, check=True).stdout
    regs = int(re.search(r"REG:(\d+)", usage).group(1))
    stack = int(re.search(r"STACK:(\d+)", usage).group(1))
    local = int(re.search(r"LOCAL:(\d+)", usage).group(1))
    arch = "sm_90a"
    v = subprocess.run([ptxas, "-v", f"--gpu-name={arch}", str(ptx), "-o", str(workdir / "x.cubin")],
                       capture_output=True, text=True)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", v.stdout + v.stderr)
    sass = subprocess.run([cuobjdump, "-sass", str(cubin)], capture_output=True, text=True, check=True).stdout
    return {"registers": regs, "stack": stack, "local": local,
            "spill_stores": int(spills.group(1)) if spills else None,
            "spill_loads": int(spills.group(2)) if spills else None, **sass_summary(sass)}


def occupancy(registers: int, num_warps: int, shared: int) -> dict:
    """CTAs per SM and occupancy from registers, warps and shared memory, with what limits it."""
    regs_per_warp = math.ceil(registers * 32 / REG_ALLOC_UNIT) * REG_ALLOC_UNIT
    limits = {"warps": MAX_WARPS_PER_SM // num_warps, "ctas": MAX_CTAS_PER_SM,
              "registers": REGS_PER_SM // max(1, regs_per_warp * num_warps),
              "shared": SMEM_PER_SM // (shared + SMEM_RESERVED_PER_CTA)}
    ctas = min(limits.values())
    return {"ctas_per_sm": ctas, "occupancy": ctas * num_warps / MAX_WARPS_PER_SM,
            "limited_by": min(limits, key=limits.get)}


# Kernels whose loops stop at each sequence's last valid token and skip tiles that start past it (see their
# sources; tests/test_attention_kl.py checks the skipping paths against float64).
SKIPS_PADDED_TILES = {"_attention_kl_fwd", "_attention_kl_bwd_dk",
                      "_attention_mse_direct_fwd_kernel"}


def score_tiles(kernel: str, constexprs: dict, spans: list[int], L: int, H: int) -> dict | None:
    """(query tile, key tile) pairs an attention kernel visits for a batch of these spans: all B·H·⌈L/BM⌉·⌈L/BN⌉
    of them, or Σ_b H·⌈n_b/BM⌉·⌈n_b/BN⌉ when it skips padded tiles."""
    bm, bn = constexprs.get("BLOCK_M"), constexprs.get("BLOCK_N")
    if not (bm and bn) or not kernel.startswith(("_attention_kl", "_attention_mse_direct")):
        return None
    dense = len(spans) * H * math.ceil(L / bm) * math.ceil(L / bn)
    needed = H * sum(math.ceil(n / bm) * math.ceil(n / bn) for n in spans)
    return {"dense": dense, "visited": needed if kernel in SKIPS_PADDED_TILES else dense, "needed": needed}


# ---------------------------------------------------------------- the cases


@dataclass(frozen=True)
class Case:
    loss: str
    dtype: str
    masked: bool
    B: int
    L: int
    d: int  # head dim (attention) or student width (hidden)
    H: int = 12

    @property
    def label(self) -> str:
        return f"{self.loss} {self.dtype} {'mask' if self.masked else 'nomask'} B={self.B} L={self.L} d={self.d}"


def full_cases() -> list[Case]:
    cases = [Case(loss, dt, m, 32, L, d) for loss in ("attention_mse", "attention_kl")
             for dt in ("fp16", "bf16", "fp32") for m in (False, True) for L in (128, 512, 2048) for d in (64, 32)]
    cases += [Case("hidden_mse", dt, m, 32, L, 384) for dt in ("fp16", "bf16", "fp32") for m in (False, True)
              for L in (128, 512, 2048)]
    cases += [Case("sinkhorn", "fp32", False, 1, 0, 0)]
    return cases


def quick_cases() -> list[Case]:
    """What the regression test compiles: BERT-base shapes, half precision, masked (the trainer's case)."""
    return [Case("attention_mse", "bf16", True, 32, 512, 64), Case("attention_kl", "bf16", True, 32, 512, 64),
            Case("attention_kl", "fp16", True, 32, 128, 32), Case("hidden_mse", "bf16", True, 32, 512, 384)]


def mixed_lengths(B: int, L: int):
    """Prefix masks of lengths spread evenly from L/8 to L (a real bucket's spread is narrower; this is the
    case padded-tile skipping is for)."""
    import torch

    lengths = torch.linspace(max(1, L // 8), L, B).round().long()
    return torch.arange(L)[None, :] < lengths[:, None]


def run_case(case: Case) -> None:
    """The loss forward and backward through fastkd.losses (FASTKD_BACKEND=triton), launches compiled only."""
    import torch

    from fastkd import losses
    from fastkd.losses.checks import value_checks

    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[case.dtype]
    os.environ["FASTKD_BACKEND"] = "triton"

    def t(*shape, grad=False):
        return torch.empty(*shape, dtype=dtype).normal_().requires_grad_(grad)

    with value_checks(False):
        if case.loss == "sinkhorn":
            cost = torch.rand(2, 6, 12)
            losses.sinkhorn(cost, torch.full((2, 6), 1 / 6), torch.full((2, 12), 1 / 12))
            return
        mask = mixed_lengths(case.B, case.L) if case.masked else None
        if case.loss == "hidden_mse":
            K, d_t = 3, 768
            h_s, w, b = t(K, case.B, case.L, case.d, grad=True), t(K, d_t, case.d, grad=True), t(K, d_t, grad=True)
            # The forward (with R stored, as for training) is the only Triton launch: the backward is cuBLAS,
            # which here would be minutes of CPU matmuls on uninitialised data.
            losses.hidden_mse(h_s, t(K, case.B, case.L, d_t), w, b, mask)
            return
        shape = (case.B, case.H, case.L, case.d)
        getattr(losses, case.loss)(t(*shape, grad=True), t(*shape, grad=True), t(*shape), t(*shape), mask).backward()


def report_rows(cases: list[Case], log=print) -> list[dict]:
    """One row per launch of every case, with its static figures."""
    rows, analysed = [], {}
    with tempfile.TemporaryDirectory() as tmp, compiling_launches() as launches:
        for case in cases:
            start = len(launches)
            run_case(case)
            for launch in launches[start:]:
                key = launch.compiled.hash
                if key not in analysed:
                    analysed[key] = resources(launch.compiled, Path(tmp))
                res = analysed[key]
                occ = occupancy(res["registers"], launch.num_warps, launch.shared)
                ctas = math.prod(launch.grid)
                spans = mixed_lengths(case.B, case.L).sum(1).tolist() if case.masked else [case.L] * case.B
                tiles = score_tiles(launch.kernel, launch.constexprs, spans, case.L, case.H) if case.L else None
                rows.append({**asdict(case), "case": case.label, "kernel": launch.kernel, "grid": list(launch.grid),
                             "score_tiles": tiles,
                             "num_warps": launch.num_warps, "num_stages": launch.num_stages, "shared": launch.shared,
                             "constexprs": launch.constexprs, **res, **occ, "ctas": ctas,
                             "waves": ctas / max(1, occ["ctas_per_sm"] * SM_COUNT)})
            log(f"  {case.label}: {len(launches) - start} launch(es)")
    return rows


# ---------------------------------------------------------------- writing the report


def _commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "kernels", "fastkd/losses"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        return sha + ("+uncommitted kernel changes" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [f"# Static sm_90 kernel report (Triton {meta['triton']}, commit {meta['commit']})", "",
             "Read off the compiled code, not measured: see bench/kernel_report.py. H100 limits: 65,536 registers, "
             "228 KB shared memory, 64 warps and 32 CTAs per SM, 132 SMs. Masked cases use prefix masks of lengths "
             "spread from L/8 to L. `inner loop` is the innermost SASS loop: instructions (mma / mufu / fp32 / "
             "shared / global / local).", ""]
    head = ("| case | kernel | grid | warps | stages | regs | spill st/ld B | smem KB | CTAs/SM (limit) | occ | waves "
            "| MMA | inner loop | score tiles visited / dense |")
    lines += [head, "|" + " --- |" * 14]
    for r in rows:
        loop = r["inner_loop"]
        mix = "/".join(str(loop.get(k, 0)) for k in ("mma", "mufu", "fp32", "shared", "global", "local"))
        lines.append(f"| {r['case']} | {r['kernel']} | {'x'.join(map(str, r['grid']))} | {r['num_warps']} | "
                     f"{r['num_stages']} | {r['registers']} | {r['spill_stores']}/{r['spill_loads']} | "
                     f"{r['shared'] / 1024:.1f} | {r['ctas_per_sm']} ({r['limited_by']}) | {r['occupancy']:.0%} | "
                     f"{r['waves']:.2f} | {r['mma']} ({r['mma_total']}) | {loop['instructions']}: {mix} | "
                     + (f"{r['score_tiles']['visited']} / {r['score_tiles']['dense']} |" if r.get("score_tiles")
                        else "|"))
    return "\n".join(lines) + "\n"


ROOFLINE_SHAPES = {"attention_kl": 64, "attention_mse": 64, "hidden_mse": 384}  # loss -> d of its estimate


def roofline_rows(rows: list[dict]) -> list[dict]:
    """bench/roofline.py's estimates (bf16, B = 32) for every reported case of ROOFLINE_SHAPES."""
    from bench import roofline

    out = []
    for (loss, L, masked), launches in _group(rows, ROOFLINE_SHAPES).items():
        spans = mixed_lengths(32, L).sum(1).tolist() if masked else [L] * 32
        out.append(roofline.estimate(loss, 32, L, ROOFLINE_SHAPES[loss], spans, launches))
    return out


def _group(rows: list[dict], shapes: dict) -> dict:
    groups: dict = {}
    for r in rows:
        if r["dtype"] == "bf16" and shapes.get(r["loss"]) == r["d"]:
            groups.setdefault((r["loss"], r["L"], r["masked"]), {})[r["kernel"]] = r
    return groups


def targets_markdown(rows: list[dict]) -> str:
    """The issue's static targets, checked over every launch of this report."""
    spills = [r for r in rows if r["dtype"] in ("fp16", "bf16") and (r["spill_stores"] or r["spill_loads"])]
    low = [r for r in rows if r["ctas_per_sm"] < 2]
    lines = ["", "## Targets", "",
             f"- fp16/bf16 launches with spills: {len(spills)} of "
             f"{sum(r['dtype'] in ('fp16', 'bf16') for r in rows)}"
             + "".join(f"\n  - {r['case']}: {r['kernel']} {r['spill_stores']}/{r['spill_loads']} B" for r in spills),
             f"- launches under 2 CTAs/SM: {len(low)}; by kernel, with the written reason:"]
    for kernel, dtype in sorted({(r["kernel"], r["dtype"]) for r in low}):
        n = sum(r["kernel"] == kernel and r["dtype"] == dtype for r in low)
        reason = low_occupancy_reason({"kernel": kernel, "dtype": dtype}) or "NO WRITTEN REASON"
        lines.append(f"  - {kernel} ({dtype}, {n} launches): {reason}")
    fp32 = [r for r in rows if r["dtype"] == "fp32" and (r["spill_stores"] or r["spill_loads"])]
    lines.append(f"- fp32 launches with spills (allowed; the fp32 paths' cost is in docs/kernels.md): {len(fp32)} "
                 f"of {sum(r['dtype'] == 'fp32' for r in rows)}, at most "
                 f"{max((r['spill_stores'] for r in fp32), default=0)} B stored a thread")
    return "\n".join(lines) + "\n"


def roofline_markdown(estimates: list[dict]) -> str:
    lines = ["", "## Roofline estimates: fused vs eager, one training step (forward + backward), bf16, B = 32",
             "", "ESTIMATES, not measurements (bench/roofline.py says how they are made; bench/gpu_session.sh "
             "measures the same cases). Attention: H = 12, d = 64, eager = fastkd.losses.reference (fp32 L×L maps). "
             "hidden_mse: K = 3 layers, 384 → 768, eager = autocast (bf16 GEMM, fp32 MSE). Masked: prefix masks "
             "of lengths L/8…L.", "",
             "| loss | L | mask | fused HBM MB | fused tensor GFLOP | fused exp (M) | fused bound per kernel | "
             "eager HBM MB | eager matmul GFLOP | eager FP32 elementwise (M) | eager exp (M) | launches fused/eager "
             "| H100 fused/eager µs | H100 speed-up | H200 speed-up | extra memory |",
             "|" + " --- |" * 16]
    for e in estimates:
        h100, h200 = e["H100 SXM"], e["H200"]
        bounds = ", ".join(f"{k}: {v}" for k, v in e["fused_bounds"].items())
        lines.append(
            f"| {e['loss']} | {e['L']} | {'mixed' if e['masked'] else 'none'} | {e['fused_bytes'] / 1e6:.0f} | "
            f"{e['fused_tensor_flops'] / 1e9:.1f} | {e['fused_exp'] / 1e6:.0f} | {bounds} | "
            f"{e['eager_bytes'] / 1e6:.0f} | {e['eager_matmul_flops'] / 1e9:.1f} | {e['eager_fp32_flops'] / 1e6:.0f} "
            f"| {e['eager_exp'] / 1e6:.0f} | {e['fused_launches']}/{e['eager_launches']} | "
            f"{h100['fused_us']:.0f} / {h100['eager_us']:.0f} | {h100['speedup']:.1f}x | {h200['speedup']:.1f}x | "
            f"{e['extra_bytes'] / 1e6:.1f} MB = {e['extra_formula']} |")
    return "\n".join(lines) + "\n"


COMPARE_CASE = "bf16 mask B=32 L=512"  # the before/after table's launches (attention d = 64, hidden d = 384)


def compare_markdown(before: dict, after: dict) -> str:
    """bench/README.md's before → after table: per kernel of the BERT-shaped bf16 masked case, the static figures
    and, for the attention kernels, the score tiles and the SASS work per (query, key) pair of the tile loop."""
    def pick(report):
        return {r["kernel"]: r for r in report["rows"] if COMPARE_CASE in r["case"] and r["d"] in (64, 384)}

    def tiles(r):
        c = r["constexprs"]
        if not (c.get("BLOCK_M") and c.get("BLOCK_N")) or not r["kernel"].startswith(("_attention_kl",
                                                                                      "_attention_mse_direct")):
            return ""
        n = r["score_tiles"]["visited"] if r.get("score_tiles") else r["B"] * r["H"] * math.ceil(
            r["L"] / c["BLOCK_M"]) * math.ceil(r["L"] / c["BLOCK_N"])  # reports before skipping: dense
        return f"{n} ({c['BLOCK_M']}x{c['BLOCK_N']})"

    def per_pair(r):
        c = r["constexprs"]
        if not tiles(r):
            return ""
        loop, pairs = r["inner_loop"], c["BLOCK_M"] * c["BLOCK_N"]
        return (f"{loop['instructions'] * r['num_warps'] / pairs:.2f} / "
                f"{loop.get('mufu', 0) * r['num_warps'] * 32 / pairs:.2f}")

    def cell(r, f):
        return f(r) if r else "-"

    b, a = pick(before), pick(after)
    lines = [f"| kernel ({COMPARE_CASE}; hidden 3x384->768) | regs | spill st/ld B | smem KB | CTAs/SM | MMA "
             "| score tiles | warp-instr / MUFU per pair |", "|" + " --- |" * 8]
    for k in list(b) + [k for k in a if k not in b]:
        rb, ra = b.get(k), a.get(k)
        cols = [lambda r: str(r["registers"]), lambda r: f"{r['spill_stores']}/{r['spill_loads']}",
                lambda r: f"{r['shared'] / 1024:.0f}", lambda r: str(r["ctas_per_sm"]), lambda r: r["mma"],
                tiles, per_pair]
        lines.append(f"| {k} | " + " | ".join(f"{cell(rb, f)} → {cell(ra, f)}" for f in cols) + " |")
    return "\n".join(lines) + "\n"


def render(report: dict) -> str:
    return (markdown(report["rows"], report["meta"]) + targets_markdown(report["rows"])
            + roofline_markdown(report["roofline"]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="only the regression test's BERT-shaped cases")
    p.add_argument("--json", help="write the rows here instead of bench/results/ (no markdown)")
    p.add_argument("--from-json", help="rewrite the markdown (and the estimates) of this report, no compiling")
    p.add_argument("--compare", nargs=2, metavar=("BEFORE", "AFTER"), help="print the before/after table")
    args = p.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    if args.compare:
        print(compare_markdown(*(json.loads(Path(f).read_text()) for f in args.compare)), end="")
        return 0
    if args.from_json:
        report = json.loads(Path(args.from_json).read_text())
        report["roofline"] = roofline_rows(report["rows"])
        Path(args.from_json).write_text(json.dumps(report, indent=1, default=str))
        Path(args.from_json).with_suffix(".md").write_text(render(report))
        return 0
    missing = tools_available()
    if missing:
        print(f"kernel_report: {missing}", file=sys.stderr)
        return 2
    import triton

    rows = report_rows(quick_cases() if args.quick else full_cases())
    meta = {"triton": triton.__version__, "commit": _commit(), "target": "sm_90 (GPUTarget('cuda', 90, 32))"}
    report = {"meta": meta, "rows": rows, "roofline": roofline_rows(rows)}
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1, default=str))
        return 0
    stem = f"kernel-report-sm90-triton-{triton.__version__}"
    (RESULTS / f"{stem}.json").write_text(json.dumps(report, indent=1, default=str))
    (RESULTS / f"{stem}.md").write_text(render(report))
    print(f"wrote bench/results/{stem}.md and .json: {len(rows)} launches")
    return 0


if __name__ == "__main__":
    sys.exit(main())
