"""fastkd used straight from a source checkout, as on the GPU image (``PYTHONPATH=<repo>``, nothing pip-installed).

There only the checkout's folders are on the path: ``kernels/`` is not inside ``fastkd/``, and pyproject's
``package-dir`` mapping (kernels -> fastkd.kernels) does not apply. The subprocess removes the editable install's
finder to see what such a machine sees.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

_PROBE = """
import sys
sys.meta_path[:] = [f for f in sys.meta_path if "__editable__" not in getattr(f, "__module__", "")]
sys.path.insert(0, {repo!r})
import fastkd
import fastkd.kernels.attention_kl as akl
from fastkd.kernels import sinkhorn
print(fastkd.__file__)
print(akl.__file__)
print(sinkhorn.__file__)
"""


def test_kernels_import_from_a_source_checkout_without_install():
    out = subprocess.run([sys.executable, "-c", _PROBE.format(repo=str(REPO))], capture_output=True, text=True,
                         cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    fastkd_file, akl_file, sinkhorn_file = out.stdout.split()
    assert Path(fastkd_file) == REPO / "fastkd" / "__init__.py"
    assert Path(akl_file) == REPO / "kernels" / "attention_kl.py"
    assert Path(sinkhorn_file) == REPO / "kernels" / "sinkhorn.py"
