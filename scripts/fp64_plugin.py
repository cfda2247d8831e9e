"""pytest plugin (scripts/check_triton_version.sh): fail the run if Triton's interpreter creates a float64 array
inside kernels/ — an fp32 kernel promoted to fp64 by a literal or a scalar argument."""

import collections
import traceback

import numpy as np
import triton.runtime.interpreter as interp

SEEN: collections.Counter = collections.Counter()
_orig = interp.TensorHandle.__init__


def _init(self, data, dtype):
    _orig(self, data, dtype)
    if getattr(data, "dtype", None) == np.float64:
        frames = [f for f in traceback.extract_stack() if "/kernels/" in f.filename]
        if frames:
            SEEN[f"{frames[-1].filename.split('/')[-1]}:{frames[-1].lineno}: {frames[-1].line}"] += 1


interp.TensorHandle.__init__ = _init


def pytest_sessionfinish(session, exitstatus):
    if SEEN and exitstatus == 0:
        session.exitstatus = 1


def pytest_terminal_summary(terminalreporter):
    terminalreporter.write_line(f"fp64 arrays created in kernels/: {len(SEEN)} site(s)")
    for k, v in SEEN.most_common(30):
        terminalreporter.write_line(f"  {v:6d}  {k}")
