"""Where each contestant's peak memory comes from: the time-to-accuracy job's contestants (bench/tta_engines.py)
run one after the other, each in its own process with a sampler thread that reads the process's VmRSS/VmHWM
every 50 ms and stamps every line the contestant prints, so the high-water mark can be read phase by phase
(set-up, training stages, final evaluation).

    python bench/peak_memory.py --task agnews --width 384 --train-examples 3000
    python bench/peak_memory.py --task sst2 --width 192

Writes bench/results/peak-memory-<task>-<width>.md (and the raw timelines under --work).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# fastkd's log lines that open its phases (the rest of its output belongs to the phase before)
FASTKD_PHASES = (("set-up", None), ("stage 1", "stage 1/"), ("stage 2", "stage 2/"),
                 ("final evaluation and latency", "student: best dev checkpoint"))


def status() -> dict[str, float]:
    out = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(("VmRSS:", "VmHWM:")):
                k, v = line.split(":")
                out[k] = int(v.split()[0]) / 1024
    return out


class Stamped:
    """A stream whose lines start with [seconds rss hwm] (MiB)."""

    def __init__(self, stream, t0: float):
        self.stream, self.t0, self.bol = stream, t0, True

    def write(self, s: str) -> int:
        parts = []
        for piece in s.splitlines(keepends=True):
            if self.bol:
                st = status()
                parts.append(f"[{time.perf_counter() - self.t0:8.2f} {st['VmRSS']:7.0f} {st['VmHWM']:7.0f}] ")
            parts.append(piece)
            self.bol = piece.endswith("\n")
        self.stream.write("".join(parts))
        self.stream.flush()
        return len(s)

    def flush(self) -> None:
        self.stream.flush()

    def isatty(self) -> bool:
        return False

    def __getattr__(self, name):
        return getattr(self.stream, name)


def child(spec_path: str) -> None:
    """Run one contestant with the sampler; its timeline goes to <trace>.rss.json."""
    from bench import tta_engines

    t0, timeline = time.perf_counter(), []

    def sample():
        while True:
            st = status()
            timeline.append((round(time.perf_counter() - t0, 2), round(st["VmRSS"]), round(st["VmHWM"])))
            time.sleep(0.05)

    threading.Thread(target=sample, daemon=True).start()
    sys.stdout, sys.stderr = Stamped(sys.stdout, t0), Stamped(sys.stderr, t0)
    try:
        tta_engines.main(spec_path)
    finally:
        spec = json.loads(Path(spec_path).read_text())
        Path(spec["out"] + ".rss.json").write_text(json.dumps(timeline))


def phases(log: str, markers) -> list[tuple[str, float]]:
    """(phase, start second) from the stamped log's first line containing each marker."""
    out = [(markers[0][0], 0.0)]
    for name, marker in markers[1:]:
        for line in log.splitlines():
            if marker in line and line.startswith("["):
                out.append((name, float(line[1:].split()[0])))
                break
    return out


def phase_peaks(timeline, starts: list[tuple[str, float]]) -> list[tuple[str, float]]:
    """Each phase's highest RSS (the process's high-water mark grows only where RSS reaches it)."""
    bounds = [*starts, ("end", float("inf"))]
    return [(name, max((r for t, r, _ in timeline if a <= t < b), default=float("nan")))
            for (name, a), (_, b) in zip(bounds, bounds[1:], strict=False)]


def git_commit() -> str:
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                          text=True).stdout.strip()


def main(argv=None) -> int:
    from bench import time_to_accuracy as tta

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="agnews")
    ap.add_argument("--width", type=int, default=384)
    ap.add_argument("--train-examples", type=int, default=None)
    ap.add_argument("--contestants", default="fastkd,textbrewer-etd")
    ap.add_argument("--work", default="/tmp/fastkd-peak-memory")
    args = ap.parse_args(argv)
    commit = git_commit()  # what the contestants run (the working tree is read at their start)
    work = Path(args.work) / f"{args.task}-{args.width}"
    work.mkdir(parents=True, exist_ok=True)
    argv_job = tta.fastkd_argv(args.task, args.width, args.train_examples, None, 64)
    prep = tta.prepare(args.task, args.width, argv_job, work, print)
    rows = []
    for name in args.contestants.split(","):
        spec = {**tta.contestant_spec(name, prep, argv_job, 50), "out": str(work / f"trace-{name}.json"),
                "work": str(work / name)}
        Path(spec["work"]).mkdir(parents=True, exist_ok=True)
        path = work / f"spec-{name}.json"
        path.write_text(json.dumps(spec))
        with open(work / f"log-{name}.txt", "w") as fh:
            rc = subprocess.call([sys.executable, __file__, "--child", str(path)], cwd=REPO, stdout=fh,
                                 stderr=subprocess.STDOUT)
        if rc:
            raise SystemExit(f"{name} failed: see {work / f'log-{name}.txt'}")
        timeline = json.loads(Path(spec["out"] + ".rss.json").read_text())
        log = (work / f"log-{name}.txt").read_text()
        starts = phases(log, FASTKD_PHASES) if name.startswith("fastkd") else [("set-up and training", 0.0)]
        rows.append((name, max(h for _, _, h in timeline), phase_peaks(timeline, starts)))
        print(f"{name}: peak {rows[-1][1]} MiB; " + ", ".join(f"{p} {v:.0f}" for p, v in rows[-1][2]), flush=True)
    ref = next((peak for name, peak, _ in rows if name.startswith("textbrewer")), None)
    lines = [f"# Peak memory by phase: {args.task} 3x{args.width}"
             + (f", {args.train_examples} training examples" if args.train_examples else ""), "",
             f"`python bench/peak_memory.py --task {args.task} --width {args.width}"
             + (f" --train-examples {args.train_examples}" if args.train_examples else "") + "` at commit "
             f"{commit}; each contestant in its own process, one after "
             "the other; MiB of resident memory (VmHWM for the peak, the highest sampled VmRSS per phase).", "",
             "| contestant | peak | vs TextBrewer | by phase |", "| --- | --- | --- | --- |"]
    for name, peak, by in rows:
        lines.append(f"| {name} | {peak} | {peak / ref:.2f}x |" if ref else f"| {name} | {peak} | |")
        lines[-1] += " " + "; ".join(f"{p}: {v:.0f}" for p, v in by) + " |"
    out = REPO / "bench" / "results" / f"peak-memory-{args.task}-{args.width}.md"
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        child(sys.argv[2])
    else:
        sys.exit(main())
