"""pytest's hooks for ``pytest bench/ --benchmark-only``: collect ``bench_*.py`` files, provide the harness's
fixtures (``measure``, ``copy_bandwidth``; see :mod:`bench.harness`) and write the results file at the end."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.harness import (  # noqa: F401
    _RECORDS,
    HAS_CUDA,
    copy_bandwidth,
    measure,
    oom_ok,
    results_path,
    skip_unless_cuda,
    write_results,
)

# ---------------------------------------------------------------- options and collection


def pytest_addoption(parser):
    parser.addoption("--tta-full", action="store_true", default=False,
                     help="bench_time_to_accuracy: the full table (SST-2 and AG News, 3x384 and 3x192) instead of "
                          "the short case")



def pytest_collect_file(file_path: Path, parent):
    """Collect ``bench_*.py`` files as test modules (pytest's default pattern is ``test_*.py``)."""
    if file_path.suffix == ".py" and file_path.name.startswith("bench_"):
        if parent.session.isinitpath(file_path):
            return None  # named on the command line: pytest's python plugin collects it already
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def pytest_sessionfinish(session, exitstatus):
    if not _RECORDS:
        return
    path = write_results(_RECORDS, results_path())
    tr = session.config.pluginmanager.get_plugin("terminalreporter")
    if tr is not None:
        tr.write_line(f"fastkd bench: {len(_RECORDS)} cases written to {path}")
