"""bench/conftest.py: results are written case by case, so a run stopped by a time limit (the device tool kills
a command at its limit) keeps every case it measured."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_cases_survive_a_killed_bench_run(tmp_path):
    suite = tmp_path / "suite"
    suite.mkdir()
    (suite / "conftest.py").write_text("from bench.conftest import *  # noqa: F401,F403\n")
    (suite / "bench_killed.py").write_text(
        "import os\n\n"
        "def test_measured(measure):\n"
        "    measure(lambda: sum(range(1000)), 'case_measured', {'n': 1000}, rounds=2)\n\n"
        "def test_killed(benchmark):\n"
        "    os._exit(3)  # what a time limit's SIGKILL leaves: no session finish\n")
    results = tmp_path / "results"
    env = dict(os.environ, FASTKD_BENCH_RESULTS=str(results), FASTKD_GIT_COMMIT="abc123",
               PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p))
    run = subprocess.run([sys.executable, "-m", "pytest", str(suite / "bench_killed.py"), "--benchmark-only", "-q",
                          "-p", "no:cacheprovider", "--rootdir", str(suite)], cwd=suite, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 3, run.stdout[-2000:] + run.stderr[-2000:]
    files = list(results.glob("*.json"))
    assert len(files) == 1, run.stdout[-2000:]
    data = json.loads(files[0].read_text())
    assert [c["case"] for c in data["cases"] if c["case"] != "copy_bandwidth"] == ["case_measured"]
    assert data["environment"]["git_commit"] == "abc123"
