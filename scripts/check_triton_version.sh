#!/usr/bin/env bash
# Run the kernel tests through the interpreter of another Triton release (default 3.6.0, the GPU image's), with
# a plugin that lists every fp64 array created inside kernels/ (an fp32 kernel should create none).
#   bash scripts/check_triton_version.sh [TRITON_VERSION]
# Triton 3.6's interpreter needs numpy < 2.3 (it calls int() on 1-element arrays), so an older numpy goes into
# the same side folder. Needs the project's .venv (bash scripts/test.sh creates it) and access to PyPI.
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=${1:-3.6.0}
SIDE=.triton-$VERSION
. .venv/bin/activate
[ -d "$SIDE/triton" ] || pip install -q --no-deps --target "$SIDE" "triton==$VERSION" "numpy==2.2.6"
export PYTHONPATH="$PWD/$SIDE:$PWD/scripts" TRITON_INTERPRET=1 HF_HUB_OFFLINE=1
python -c "import triton, numpy; print('triton', triton.__version__, 'numpy', numpy.__version__)"
python -m pytest -q -p no:cacheprovider -p fp64_plugin tests/test_attention_kl.py tests/test_attention_mse.py \
  tests/test_hidden_mse.py tests/test_sinkhorn.py tests/test_layer_costs.py tests/test_kernel_sources.py
# Every kernel compiled for sm_90 exactly as fastkd.losses launches it (a stub driver, real JIT functions: no
# interpreter), with its static figures: bench/results/kernel-report-sm90-triton-$VERSION.{md,json}.
env -u TRITON_INTERPRET python bench/kernel_report.py
