"""Compile every Triton kernel for a GPU target without a GPU (ahead of time, through ptxas), with the argument
types and constexprs the kernel tests actually launch it with.

    python scripts/compile_kernels.py record            # TRITON_INTERPRET=1: GPU-shaped calls, record launches
    python scripts/compile_kernels.py record-tests [pytest args]  # or: the launches of the kernel tests
    python scripts/compile_kernels.py compile [--arch 90]           # compile each recorded launch for sm_<arch>

`record` runs every fused loss forward and backward (fp32, fp16, bf16; with and without a padding mask) on
small inputs with the GPU's tile sizes and warps (the kernels' interpreter switches are turned off), so what is
recorded is what a GPU launches. It writes .kernel-launches.json (one entry per distinct
kernel/signature/constexprs/num_warps); `compile`
lowers each through TTIR → TTGIR → LLVM → PTX → cubin with the installed triton and prints the failures. It
shows that the kernels compile with a given triton release (e.g. the GPU image's 3.6, through
scripts/check_triton_version.sh); it says nothing about speed or numerical results on the device.
"""

from __future__ import annotations

import importlib
import inspect
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAUNCHES = ROOT / ".kernel-launches.json"
PER_KERNEL = 40  # distinct specialisations compiled per kernel at most


def _arg_type(v) -> str | None:
    import torch

    if isinstance(v, torch.Tensor):
        names = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64",
                 torch.int32: "i32", torch.int64: "i64", torch.int8: "i8", torch.uint8: "u8", torch.bool: "i1"}
        return "*" + names[v.dtype]
    if isinstance(v, bool):
        return "i1"
    if isinstance(v, int):
        return "i32" if -2**31 <= v < 2**31 else "i64"
    if isinstance(v, float):
        return "fp32"
    return None


def _encode(v):
    import triton.language as tl

    if isinstance(v, tl.dtype):
        return {"tl_dtype": v.name}
    return v if isinstance(v, (int, float, bool, str, type(None))) else str(v)


def _decode(v):
    import triton.language as tl

    return getattr(tl, {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "fp64": "float64"}.get(
        v["tl_dtype"], v["tl_dtype"])) if isinstance(v, dict) else v


class _Recorder:
    """A pytest plugin: wraps the interpreter's launch to note each kernel's types and constexprs."""

    def __init__(self):
        self.seen: dict[str, dict] = {}

    def pytest_configure(self, config):
        import triton.runtime.interpreter as interp

        original = interp.InterpretedFunction.run
        seen = self.seen

        def run(fn_self, *args, grid, warmup, **kwargs):
            fn = fn_self.fn
            params = inspect.signature(fn).parameters
            bound = inspect.signature(fn).bind_partial(*args, **{k: v for k, v in kwargs.items() if k in params})
            signature, constexprs = {}, {}
            for name, p in params.items():
                v = bound.arguments.get(name, p.default)
                if "constexpr" in str(p.annotation) or v is None:
                    signature[name] = "constexpr"
                    constexprs[name] = v if not hasattr(v, "value") else v.value
                else:
                    signature[name] = _arg_type(v)
            options = {k: kwargs[k] for k in ("num_warps", "num_stages") if k in kwargs}
            entry = {"module": fn.__module__, "name": fn.__name__, "signature": signature,
                     "constexprs": {k: _encode(v) for k, v in constexprs.items()}, "options": options}
            key = json.dumps(entry, sort_keys=True, default=str)
            seen.setdefault(key, entry)
            return original(fn_self, *args, grid=grid, warmup=warmup, **kwargs)

        interp.InterpretedFunction.run = run

    def pytest_sessionfinish(self, session, exitstatus):
        per: dict[str, list] = {}
        for e in self.seen.values():
            per.setdefault(f"{e['module']}.{e['name']}", []).append(e)
        chosen = [e for es in per.values() for e in es[:PER_KERNEL]]
        LAUNCHES.write_text(json.dumps(chosen, indent=1))
        print(f"\nrecorded {len(self.seen)} distinct launches of {len(per)} kernels; kept {len(chosen)} "
              f"in {LAUNCHES.name}")


def record_gpu_shaped() -> int:
    """Launch each kernel as a GPU would (GPU tiles, no interpreter upcasts) on small inputs, recording launches.
    The interpreter may not finish every such launch (e.g. bf16 dots); the launch is recorded before it runs."""
    import os

    os.environ["TRITON_INTERPRET"] = "1"
    import fastkd.kernels._common as common
    import fastkd.kernels.attention_kl as akl
    import fastkd.kernels.attention_mse as amse
    import fastkd.kernels.hidden_mse as hmse
    import fastkd.kernels.sinkhorn as skn
    import torch

    # GPU tile sizes and warps, no interpreter upcasts: every module that asks kernels/_common whether it runs in
    # the interpreter is told no (each holds its own reference to the function).
    for module in (common, akl, amse, hmse):
        module.interpreting = lambda: False
    rec = _Recorder()
    rec.pytest_configure(None)
    g = torch.Generator().manual_seed(0)
    B, H, L = 1, 2, 80  # L not a multiple of the 64-wide tiles

    def run(name, fn, *args):
        try:
            out = fn(*args)
            if out.requires_grad:
                out.backward()
        except Exception as exc:  # the launch was recorded; the interpreter could not execute it
            print(f"  (interpreter could not run {name}: {type(exc).__name__}: {str(exc).splitlines()[0][:120]})")

    def rnd(dtype, *shape, grad=False):
        return torch.randn(*shape, generator=g).to(dtype).requires_grad_(grad)

    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for masked in (False, True):
            mask = None
            if masked:
                mask = torch.ones(B, L, dtype=torch.bool)
                mask[:, L - 7:] = False
            for d_s, d_t in ((32, 64), (64, 64), (16, 128)):  # student/teacher head dims (…, BERT-base's 64)
                qk = [rnd(dtype, B, H, L, d, grad=i < 2) for i, d in enumerate((d_s, d_s, d_t, d_t))]
                run(f"attention_kl {dtype} {d_s}/{d_t}", akl.attention_kl, *qk, mask)
                run(f"attention_mse {dtype} {d_s}/{d_t}", amse.attention_mse, *qk, mask)
            for K, d_s, d_t in ((1, 384, 384), (3, 192, 384), (4, 312, 768)):
                h_s = rnd(dtype, K, B, L, d_s, grad=True)
                w, b = rnd(dtype, K, d_t, d_s, grad=True), rnd(dtype, K, d_t, grad=True)
                run(f"hidden_mse {dtype} K={K}", hmse.hidden_mse, h_s, rnd(dtype, K, B, L, d_t), w, b, mask)
                run(f"hidden_mse {dtype} K={K} no projection", hmse.hidden_mse, h_s, rnd(dtype, K, B, L, d_s), None,
                    None, mask)
        for P, M, N in ((2, 3, 6), (4, 6, 12), (2, 24, 24)):  # BERT-EMD's layer counts
            cost = torch.rand(P, M, N, generator=g).to(dtype)
            run(f"sinkhorn {dtype} {M}x{N}", skn.sinkhorn, cost, torch.full((P, M), 1.0 / M).to(dtype),
                torch.full((P, N), 1.0 / N).to(dtype))
    rec.pytest_sessionfinish(None, 0)
    return 0


def record(pytest_args: list[str]) -> int:
    import os

    os.environ["TRITON_INTERPRET"] = "1"
    import pytest

    return pytest.main(pytest_args or ["-q", "-x", "-p", "no:cacheprovider", "tests/test_attention_kl.py",
                                       "tests/test_attention_mse.py", "tests/test_hidden_mse.py",
                                       "tests/test_sinkhorn.py"], plugins=[_Recorder()])


def compile_all(arch: int) -> int:
    import os
    import tempfile

    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="triton-aot-")  # compile for real, no cache hits
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    launches = json.loads(LAUNCHES.read_text())
    target = GPUTarget("cuda", arch, 32)
    failures = 0
    print(f"triton {triton.__version__}: compiling {len(launches)} launches for sm_{arch}")
    for e in launches:
        mod = importlib.import_module(e["module"])
        fn = getattr(mod, e["name"])
        constexprs = {k: _decode(v) for k, v in e["constexprs"].items()}
        src = ASTSource(fn, signature=e["signature"], constexprs=constexprs)
        t0 = time.time()
        try:
            kernel = triton.compile(src, target=target, options=e["options"])
            shared = kernel.metadata.shared if hasattr(kernel.metadata, "shared") else None
            print(f"  ok   {e['name']:<28} {time.time() - t0:5.1f}s  {e['options']} shared={shared}B "
                  f"{ {k: v for k, v in constexprs.items() if k.isupper()} }")
        except Exception as exc:  # report every failure, then exit non-zero
            failures += 1
            msg = [x for x in str(exc).strip().splitlines() if x.strip() and x.strip() != "^"]
            print(f"  FAIL {e['name']:<28} {e['options']} {constexprs}: {type(exc).__name__}: "
                  + " | ".join(msg[-3:]))
    print(f"{len(launches) - failures} compiled, {failures} failed")
    return 1 if failures else 0


def main(argv: list[str]) -> int:
    sys.path.insert(0, str(ROOT))
    if argv[:1] == ["record"]:
        return record_gpu_shaped()
    if argv[:1] == ["record-tests"]:
        return record(argv[1:])
    if argv[:1] == ["compile"]:
        arch = int(argv[argv.index("--arch") + 1]) if "--arch" in argv else 90
        return compile_all(arch)
    print(__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
