"""Running from a source checkout: its top-level ``kernels/`` folder is fastkd's (``fastkd.kernels``), but the
name ``kernels`` is PyPI's package, which transformers >= 5.25 depends on and imports when a model module loads.
With the checkout's root on sys.path (pytest, ``python -m``) the folder shadowed it and every model import
failed (``cannot import name 'CUDAProperties' from 'kernels'``)."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_the_name_kernels_is_pypis_package_when_it_is_installed():
    try:
        importlib.metadata.version("kernels")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("PyPI's kernels is not installed here (transformers < 5.25 does not need it)")
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import kernels, fastkd.losses; "
            "print(kernels.__file__); print(sys.modules['fastkd.kernels'].__file__)")
    out = subprocess.run([sys.executable, "-c", code, str(REPO)], capture_output=True, text=True, timeout=120,
                         cwd=REPO)
    assert out.returncode == 0, out.stderr[-2000:]
    pypi, ours = out.stdout.split()
    assert not Path(pypi).resolve().is_relative_to(REPO / "kernels")  # PyPI's, not the checkout's folder
    assert Path(ours).resolve() == REPO / "kernels" / "__init__.py"  # fastkd's kernels stay fastkd.kernels
