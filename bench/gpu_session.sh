#!/usr/bin/env bash
# Everything a lent GPU should show, in one device call (see bench/README.md, "On a lent GPU"):
#   1. the kernel tests compiled natively (no interpreter),
#   2. pytest bench/ --benchmark-only (fused vs eager vs torch.compile, Sinkhorn, trainer throughput).
# Prepare the carried folders first with `bash bench/prepare_gpu_carry.sh`; it prints the device call.
# Logs and result JSON go to $OUT (the device tool's folder) or bench/results/gpu-run.
# Without a CUDA GPU (scripts/check_gpu_image.sh replays this on a CPU) the kernel tests run in Triton's
# interpreter and the GPU-only benchmark cases skip.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/gpu-run}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
# The GPU image has torch/triton/transformers but not datasets (and two of its needs): their wheels travel in
# .whl/. fastkd itself is used from the checkout (fastkd/__init__.py maps kernels/ to fastkd.kernels there).
export PYTHONPATH=$PWD
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "gpu_session: installing .whl/ failed" >&2; exit 1; }
  export PYTHONPATH=/tmp/site:$PWD
fi
[ -d .teacher ] && export FASTKD_TEACHER_DIR=$PWD/.teacher  # half-precision copy of the packaged teacher
if [ -d .data ]; then export FASTKD_DATA_DIR=$PWD/.data; else export FASTKD_DATA_DIR=${FASTKD_DATA_DIR:-$PWD/shared/data}; fi
if python3 -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
  unset TRITON_INTERPRET
else
  export TRITON_INTERPRET=1
  echo "gpu_session: no CUDA device: kernel tests run in Triton's interpreter, GPU benchmark cases skip"
fi
export FASTKD_BENCH_RESULTS="$OUT/bench"  # a folder: conftest writes <device>-<date>.json into it

{ nvidia-smi || echo "nvidia-smi: not available"
  python3 -c "import sys, torch, triton; print('python', sys.version.split()[0], '| torch', torch.__version__,
'| triton', triton.__version__, '| cuda', torch.cuda.is_available())"
  python3 -m pip list 2>/dev/null | grep -iE "^(transformers|tokenizers|safetensors|huggingface.hub|numpy|datasets|\
pyarrow|fsspec|dill|multiprocess|pytest|pytest.benchmark|nvidia.ml.py) "
  git rev-parse HEAD; } > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# Fail in seconds, not after the tests, when something the runs need is missing.
python3 - <<'EOF' || exit 1
import datasets, pytest_benchmark  # noqa: F401  (the trainer's data; the bench harness)
import fastkd.kernels.attention_kl, fastkd.train  # noqa: F401
from fastkd.models import default_teacher_path
print("gpu_session: imports ok; teacher at", default_teacher_path())
EOF

python3 -m pytest tests/test_attention_kl.py tests/test_attention_mse.py tests/test_hidden_mse.py \
  tests/test_sinkhorn.py tests/test_layer_costs.py tests/test_losses.py -q -p no:cacheprovider 2>&1 \
  | tee "$OUT/tests.log" | tail -5
python3 -m pytest bench/ ${FASTKD_BENCH_ARGS:---benchmark-only} -q -p no:cacheprovider 2>&1 \
  | tee "$OUT/bench.log" | tail -5
python3 bench/summarize.py "$OUT/bench" > "$OUT/bench.md" 2>&1; tail -40 "$OUT/bench.md"
