"""fastkd's benchmark harness (the pytest hooks are in ``bench/conftest.py``): ``pytest bench/ --benchmark-only``.

* ``measure`` (fixture): times a callable and records one *case* (name + params) with its median time, peak
  memory, achieved bandwidth / FLOP rate and, on NVIDIA GPUs, power, energy and utilisation.
  GPU: ``triton.testing.do_bench`` (warm-up, synchronised, median). CPU: pytest-benchmark's own timer.
* ``copy_bandwidth`` (session fixture): a measured large same-device copy, the roofline each kernel's
  achieved GB/s is compared against (``pct_copy_bw``); it is recorded as the case ``copy_bandwidth``.
* ``skip_unless_cuda`` (mark) and ``oom_ok`` (context manager): GPU-only cases skip with a reason on the
  CPU; a baseline that runs out of memory is recorded with ``status="oom"`` instead of failing.
* At the end of the session every recorded case goes to ``bench/results/<device-slug>-<date>.json``
  (``FASTKD_BENCH_RESULTS`` overrides the folder), merged with that file's earlier cases, together with the
  device, driver, library versions and git commit. ``python bench/summarize.py <json>`` makes a table.

Bench files are ``bench/bench_*.py`` (collected by conftest's hook); their tests are ``test_*`` functions.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import functools
import json
import os
import platform
import re
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

from fastkd.device import cpu_model, device_name

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
HAS_CUDA = torch.cuda.is_available()

# Every case recorded in this session, in order (written out by pytest_sessionfinish).
_RECORDS: list[dict[str, Any]] = []

skip_unless_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU (Triton kernel timing)")


# ---------------------------------------------------------------- records


@dataclass
class CaseRecord:
    """One benchmark case. Times in ms, memory in MiB, bandwidth in GB/s (1e9 bytes/s)."""

    case: str
    params: dict[str, Any]
    device: str
    status: str = "ok"  # "ok" | "oom" | "error"
    median_ms: float | None = None
    min_ms: float | None = None
    rounds: int | None = None
    timer: str | None = None  # "do_bench" (GPU) or "pytest-benchmark" (CPU)
    peak_mem_mib: float | None = None  # GPU: max_memory_allocated over the call minus the baseline
    rss_high_water_delta_mib: float | None = None  # CPU: growth of the process's max RSS (0 if no new peak)
    bytes_moved: int | None = None
    gbps: float | None = None
    pct_copy_bw: float | None = None
    flops: float | None = None
    tflops: float | None = None
    power_w: float | None = None  # NVML board power right after the timed loop
    energy_mj_per_call: float | None = None  # NVML total-energy counter delta over the loop / calls
    gpu_util_pct: float | None = None  # NVML utilisation sample right after the timed loop
    note: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _jsonable(v: Any) -> Any:
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    if isinstance(v, torch.dtype):
        return str(v).replace("torch.", "")
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return str(v)


def device_slug() -> str:
    name = device_name() if HAS_CUDA else f"cpu-{platform.machine()}"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


# ---------------------------------------------------------------- NVML (power, energy, utilisation)


class _Nvml:
    """Thin, failure-tolerant wrapper over nvidia-ml-py: every reading is None when NVML is unavailable."""

    def __init__(self) -> None:
        self.handle = None
        if not HAS_CUDA:
            return
        try:
            import pynvml

            pynvml.nvmlInit()
            index = torch.cuda.current_device()
            visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
            ids = [x for x in visible.split(",") if x.strip()]
            if ids and ids[index].strip().isdigit():
                index = int(ids[index])
            self.nvml = pynvml
            self.handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        except Exception:  # noqa: BLE001 - NVML missing or not permitted: readings stay None
            self.handle = None

    def _read(self, fn: str, *args):
        if self.handle is None:
            return None
        try:
            return getattr(self.nvml, fn)(self.handle, *args)
        except Exception:  # noqa: BLE001
            return None

    def energy_mj(self) -> int | None:
        return self._read("nvmlDeviceGetTotalEnergyConsumption")

    def power_w(self) -> float | None:
        mw = self._read("nvmlDeviceGetPowerUsage")
        return None if mw is None else mw / 1000.0

    def util_pct(self) -> float | None:
        u = self._read("nvmlDeviceGetUtilizationRates")
        return None if u is None else float(u.gpu)

    def driver(self) -> str | None:
        if self.handle is None:
            return None
        try:
            d = self.nvml.nvmlSystemGetDriverVersion()
            return d.decode() if isinstance(d, bytes) else d
        except Exception:  # noqa: BLE001
            return None


_NVML: _Nvml | None = None


def _nvml() -> _Nvml:
    global _NVML
    if _NVML is None:
        _NVML = _Nvml()
    return _NVML


# ---------------------------------------------------------------- OOM handling


def is_oom(exc: BaseException) -> bool:
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(exc, (RuntimeError, MemoryError)) and "out of memory" in str(exc).lower()


@contextlib.contextmanager
def oom_ok(record: dict[str, Any] | None = None) -> Iterator[dict[str, Any]]:
    """Swallow an out-of-memory error, marking ``record["status"] = "oom"`` (and freeing the cache).

    ``with oom_ok() as r: run()`` -> ``r["status"]`` is "ok" or "oom". ``measure(..., allow_oom=True)``
    uses this so an eager baseline that does not fit is recorded as OOM, not reported as a failure."""
    record = {} if record is None else record
    record.setdefault("status", "ok")
    try:
        yield record
    except BaseException as exc:  # noqa: B902 - filtered by is_oom; everything else re-raised
        if not is_oom(exc):
            raise
        record["status"] = "oom"
        record["note"] = str(exc).splitlines()[0][:200]
        if HAS_CUDA:
            torch.cuda.empty_cache()


# ---------------------------------------------------------------- copy bandwidth (the roofline)


def _measure_copy_gbps(nbytes: int) -> dict[str, Any]:
    """Median GB/s of a same-device copy of ``nbytes`` (read + write counted: 2·nbytes per copy)."""
    dev = "cuda" if HAS_CUDA else "cpu"
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=dev).uniform_()
    dst = torch.empty_like(src)
    if HAS_CUDA:
        import triton.testing

        ms = float(triton.testing.do_bench(lambda: dst.copy_(src), warmup=25, rep=200, return_mode="median"))
    else:
        times = []
        for _ in range(7):
            t0 = time.perf_counter()
            dst.copy_(src)
            times.append(time.perf_counter() - t0)
        ms = sorted(times)[len(times) // 2] * 1e3
    moved = 2 * src.numel() * 4
    return {"bytes_moved": moved, "median_ms": ms, "gbps": moved / (ms * 1e-3) / 1e9}


@pytest.fixture(scope="session")
def copy_bandwidth() -> float:
    """Measured same-device copy bandwidth in GB/s (1 GiB on a GPU, 64 MiB on the CPU), measured once."""
    for r in _RECORDS:
        if r["case"] == "copy_bandwidth":
            return r["gbps"]
    nbytes = (1 << 30) if HAS_CUDA else (64 << 20)
    m = _measure_copy_gbps(nbytes)
    rec = CaseRecord(case="copy_bandwidth", params={"nbytes": nbytes}, device=device_name(),
                     median_ms=m["median_ms"], bytes_moved=m["bytes_moved"], gbps=m["gbps"], pct_copy_bw=100.0,
                     timer="do_bench" if HAS_CUDA else "perf_counter",
                     note="torch copy_ between two buffers on one device; read + write bytes counted")
    _RECORDS.append(_jsonable(asdict(rec)))
    return m["gbps"]


# ---------------------------------------------------------------- measure


def _sync() -> None:
    if HAS_CUDA:
        torch.cuda.synchronize()


def _max_rss_mib() -> float:
    # ru_maxrss is KiB on Linux, bytes on macOS.
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / (1 << 20) if sys.platform == "darwin" else r / 1024


@pytest.fixture
def measure(benchmark, request, copy_bandwidth):
    """``measure(fn, case, params, bytes_moved=None, flops=None, allow_oom=False, rounds=None) -> dict``.

    Times ``fn()`` (e.g. a forward+backward closure), records the case and stores its numbers in
    ``benchmark.extra_info``. Call it once per test (pytest-benchmark allows one benchmark per test);
    parametrise the test for several cases."""

    def _measure(fn: Callable[[], Any], case: str, params: dict[str, Any] | None = None, *,
                 bytes_moved: int | None = None, flops: float | None = None, allow_oom: bool = False,
                 rounds: int | None = None, note: str | None = None, time_scale: float = 1.0) -> dict[str, Any]:
        """``time_scale``: multiply the measured time (e.g. P/k when only k of P looped problems were timed);
        the unscaled median is kept as ``extra["measured_ms"]``."""
        params = dict(params or {})
        rec = CaseRecord(case=case, params=params, device=device_name(), bytes_moved=bytes_moved, flops=flops,
                         note=note)
        status: dict[str, Any] = {}
        guard = oom_ok(status) if allow_oom else contextlib.nullcontext(status)
        with guard:
            if HAS_CUDA:
                _time_cuda(fn, rec, benchmark, rounds)
            else:
                _time_cpu(fn, rec, benchmark, rounds)
        if status.get("status") == "oom":
            rec.status, rec.note = "oom", status.get("note")
            rec.median_ms = rec.min_ms = None
            if not benchmark.disabled and getattr(benchmark, "stats", None) is None:
                # Still register the test with pytest-benchmark so --benchmark-only keeps it.
                benchmark.pedantic(lambda: None, rounds=1, iterations=1)
        if rec.median_ms and time_scale != 1.0:
            rec.extra["measured_ms"] = rec.median_ms
            rec.extra["time_scale"] = time_scale
            rec.median_ms *= time_scale
            rec.min_ms = None if rec.min_ms is None else rec.min_ms * time_scale
        if rec.median_ms and bytes_moved:
            rec.gbps = bytes_moved / (rec.median_ms * 1e-3) / 1e9
            rec.pct_copy_bw = 100.0 * rec.gbps / copy_bandwidth if copy_bandwidth else None
        if rec.median_ms and flops:
            rec.tflops = flops / (rec.median_ms * 1e-3) / 1e12
        out = _jsonable(asdict(rec))
        out["test"] = request.node.nodeid
        benchmark.extra_info.update({k: v for k, v in out.items() if v is not None and k != "extra"})
        if not benchmark.disabled:  # --benchmark-disable runs each case once, untimed: nothing to record
            _RECORDS.append(out)
            # Written case by case too: a run stopped by a time limit keeps what it measured.
            write_results([out], results_path())
        return out

    return _measure


def _time_cpu(fn, rec: CaseRecord, benchmark, rounds: int | None) -> None:
    rss0 = _max_rss_mib()
    benchmark.pedantic(fn, rounds=rounds or 5, warmup_rounds=1, iterations=1)
    rec.rss_high_water_delta_mib = _max_rss_mib() - rss0
    rec.timer = "pytest-benchmark"
    stats = getattr(getattr(benchmark, "stats", None), "stats", None)
    if stats is not None:
        rec.median_ms, rec.min_ms, rec.rounds = stats.median * 1e3, stats.min * 1e3, stats.rounds


def _time_cuda(fn, rec: CaseRecord, benchmark, rounds: int | None) -> None:
    import triton.testing

    if benchmark.disabled:  # a smoke run: once, untimed
        benchmark.pedantic(fn)
        return
    # Peak memory of one call, over what was already allocated (inputs, weights).
    fn()
    _sync()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    _sync()
    rec.peak_mem_mib = (torch.cuda.max_memory_allocated() - base) / (1 << 20)

    ms = triton.testing.do_bench(fn, warmup=25, rep=100, quantiles=[0.5, 0.0], return_mode="median")
    rec.median_ms, rec.min_ms = float(ms[0]), float(ms[1])
    rec.timer = "do_bench"

    # Power / energy / utilisation over a loop long enough (>= ~0.3 s) for NVML's counters to move.
    nv = _nvml()
    calls = max(10, int(300.0 / max(rec.median_ms, 1e-3)))
    calls = min(calls, 100_000)
    e0 = nv.energy_mj()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    _sync()
    elapsed = time.perf_counter() - t0
    e1 = nv.energy_mj()
    rec.power_w, rec.gpu_util_pct = nv.power_w(), nv.util_pct()
    if e0 is not None and e1 is not None:
        rec.energy_mj_per_call = (e1 - e0) / calls
    rec.extra["loop_calls"] = calls
    rec.extra["loop_ms_per_call"] = elapsed * 1e3 / calls  # includes launch overhead

    def synced():
        fn()
        _sync()

    # Registers the case with pytest-benchmark (its table shows synchronised wall time per call).
    benchmark.pedantic(synced, rounds=rounds or 10, warmup_rounds=1, iterations=1)
    rec.rounds = rounds or 10


# ---------------------------------------------------------------- session metadata + results file


def _version(mod: str) -> str | None:
    try:
        m = __import__(mod)
        return getattr(m, "__version__", None)
    except Exception:  # noqa: BLE001
        return None


@functools.lru_cache(maxsize=1)
def _git_commit() -> str | None:
    """HEAD (``+dirty`` when tracked files differ), or ``FASTKD_GIT_COMMIT`` where the checkout has no .git (the
    device machine gets a copy of the working tree; bench/gpu_session.sh sets it)."""
    if os.environ.get("FASTKD_GIT_COMMIT"):
        return os.environ["FASTKD_GIT_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_DIR, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_DIR,
                               capture_output=True, text=True, timeout=10)
        commit = out.stdout.strip() or None
        return f"{commit}+dirty" if commit and dirty.stdout.strip() else commit
    except Exception:  # noqa: BLE001
        return None


def environment() -> dict[str, Any]:
    env = {
        "device": device_name(),
        "device_slug": device_slug(),
        "cuda": HAS_CUDA,
        "driver": _nvml().driver() if HAS_CUDA else None,
        "cuda_runtime": torch.version.cuda,
        "torch": torch.__version__,
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "python": platform.python_version(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "triton_interpret": os.environ.get("TRITON_INTERPRET", ""),
        "git_commit": _git_commit(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    if HAS_CUDA:
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        env["gpu_memory_gib"] = round(props.total_memory / (1 << 30), 1)
        env["sm_count"] = props.multi_processor_count
    return env


def results_path() -> Path:
    folder = Path(os.environ.get("FASTKD_BENCH_RESULTS", BENCH_DIR / "results"))
    return folder / f"{device_slug()}-{_dt.date.today().isoformat()}.json"


def _case_key(r: dict[str, Any]) -> str:
    return json.dumps([r.get("case"), r.get("params")], sort_keys=True)


def write_results(records: list[dict[str, Any]], path: Path) -> Path:
    """Write ``records`` to ``path``, replacing same (case, params) entries of an earlier run that day."""
    path.parent.mkdir(parents=True, exist_ok=True)
    merged: dict[str, dict[str, Any]] = {}
    if path.exists():
        try:
            for r in json.loads(path.read_text()).get("cases", []):
                merged[_case_key(r)] = r
        except (json.JSONDecodeError, AttributeError):
            pass
    for r in records:
        merged[_case_key(r)] = r
    payload = {"environment": environment(), "cases": list(merged.values())}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=1, sort_keys=False) + "\n")
    tmp.replace(path)
    return path
