#!/usr/bin/env bash
# What a lent GPU should show, within one device call's 10-minute limit (bench/README.md, "On a lent GPU").
#   bash bench/gpu_session.sh [STAGE ...]      default: risky trainer tests kernels sinkhorn, in that order
# Stages, most important first:
#   risky     the cases the static report (bench/kernel_report.py) is least sure of, timed first: attention MSE and
#             attention KL forward + backward at L=512, bf16, fused vs eager vs torch.compile
#   trainer   bench/bench_trainer.py: the trainer's samples/s, eager fp32 baseline vs fastkd (issue #5's figure),
#             and bench/bench_teacher_cache.py: a live fp16 teacher forward vs a cache read of the same tensors
#   tta       bench/time_to_accuracy.py at B=32, L=128: fastkd vs TextBrewer vs the HF Trainer, wall time to 95/97%
#             of the teacher's dev accuracy on 8,000 SST-2 examples (results in $OUT/tta-gpu.{md,json})
#   tests     the kernel tests compiled natively (no interpreter), in parallel processes when pytest-xdist is there
#   kernels   bench of the fused attention KL / attention MSE / hidden MSE vs eager vs torch.compile
#   sinkhorn  bench of the batched Sinkhorn and BERT-EMD's layer costs
# Each stage runs under `timeout` with what is left of FASTKD_GPU_BUDGET_S (default 560 s), so the script always
# ends with a summary before the device kills it; a stage cut short keeps the cases it measured (they are written
# one by one). Results accumulate in .gpu-results/ (ignored; it survives between calls on a warm machine) and are
# copied to $OUT, so a session can call again with the stages still missing.
# Prepare the carried folders first with `bash bench/prepare_gpu_carry.sh`: it prints the device call.
# Without a CUDA GPU (scripts/check_gpu_image.sh replays this on a CPU) the kernel tests run in Triton's
# interpreter and the GPU-only benchmark cases skip.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/gpu-run}
BUDGET=${FASTKD_GPU_BUDGET_S:-560}
STAGES=("$@"); [ ${#STAGES[@]} -eq 0 ] && STAGES=(risky trainer tta tests kernels sinkhorn)
mkdir -p "$OUT" .gpu-results
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
# The device gets a copy of the working tree, perhaps without .git: prepare_gpu_carry.sh records the commit.
commit=$(git rev-parse HEAD 2>/dev/null) || commit=$(cat .whl/fastkd-commit.txt 2>/dev/null) || commit=unknown
export FASTKD_GIT_COMMIT=${FASTKD_GIT_COMMIT:-$commit}
if python3 -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
  unset TRITON_INTERPRET
else
  export TRITON_INTERPRET=1
  echo "gpu_session: no CUDA device: kernel tests run in Triton's interpreter, GPU benchmark cases skip"
fi
export FASTKD_BENCH_RESULTS=$PWD/.gpu-results  # a folder: conftest writes <device>-<date>.json into it

{ nvidia-smi || echo "nvidia-smi: not available"
  python3 -c "import sys, torch, triton; print('python', sys.version.split()[0], '| torch', torch.__version__,
'| triton', triton.__version__, '| cuda', torch.cuda.is_available())"
  python3 -m pip list 2>/dev/null | grep -iE "^(transformers|tokenizers|safetensors|huggingface.hub|numpy|datasets|\
pyarrow|fsspec|dill|multiprocess|pytest|pytest.benchmark|pytest.xdist|nvidia.ml.py) "
  echo "fastkd commit $FASTKD_GIT_COMMIT"; } > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# Fail in seconds, not after the tests, when something the runs need is missing.
python3 - <<'EOF' || exit 1
import datasets, pytest_benchmark  # noqa: F401  (the trainer's data; the bench harness)
import fastkd.kernels.attention_kl, fastkd.train  # noqa: F401
from fastkd.models.teacher import default_teacher_path
print("gpu_session: imports ok; teacher at", default_teacher_path())
EOF

start=$SECONDS
stage() {  # stage NAME CAP_S CMD...: run CMD for at most CAP_S and what the budget leaves (25 s kept for the end)
  local name=$1 cap=$2; shift 2
  local left=$(( BUDGET - (SECONDS - start) - 25 ))
  (( cap > left )) && cap=$left
  if (( cap < 30 )); then echo "gpu_session: $name skipped: ${left}s of the budget left" | tee "$OUT/$name.log"; return; fi
  echo "gpu_session: $name (at most ${cap}s)"
  timeout -k 10 "$cap" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  (( rc == 124 || rc == 137 )) && echo "gpu_session: $name stopped at its ${cap}s limit (cases measured so far are kept)" \
    | tee -a "$OUT/$name.log"
  tail -4 "$OUT/$name.log"
}
xdist=(); python3 -c "import xdist" 2>/dev/null && [ -z "${TRITON_INTERPRET:-}" ] && xdist=(-n 8)
PYTEST=(python3 -m pytest -q -p no:cacheprovider)
for s in "${STAGES[@]}"; do
  case $s in
    risky) stage risky 150 "${PYTEST[@]}" bench/bench_attention_mse.py bench/bench_attention_kl.py -k "512" \
             ${FASTKD_BENCH_ARGS:---benchmark-only} ;;
    trainer) stage trainer 240 "${PYTEST[@]}" bench/bench_trainer.py bench/bench_teacher_cache.py \
               ${FASTKD_BENCH_ARGS:---benchmark-only} ;;
    tta) stage tta 240 python3 bench/time_to_accuracy.py --tasks sst2 --widths 384 --train-examples 8000 \
           --dev-examples 872 --max-length 128 --eval-every 10 --contestants fastkd,textbrewer-etd,hf-trainer \
           --out "$OUT/tta-gpu" ;;
    tests) stage tests 300 "${PYTEST[@]}" "${xdist[@]}" tests/test_attention_kl.py tests/test_attention_mse.py \
             tests/test_hidden_mse.py tests/test_sinkhorn.py tests/test_layer_costs.py tests/test_losses.py \
             tests/test_inference_teacher.py ;;
    kernels) stage kernels 560 "${PYTEST[@]}" bench/bench_attention_kl.py bench/bench_attention_mse.py \
               bench/bench_hidden_mse.py ${FASTKD_BENCH_ARGS:---benchmark-only} ;;
    sinkhorn) stage sinkhorn 300 "${PYTEST[@]}" bench/bench_sinkhorn.py ${FASTKD_BENCH_ARGS:---benchmark-only} ;;
    *) echo "gpu_session: unknown stage '$s' (risky, trainer, tta, tests, kernels, sinkhorn)" >&2; exit 2 ;;
  esac
done
mkdir -p "$OUT/bench" && cp .gpu-results/*.json "$OUT/bench/" 2>/dev/null
python3 bench/summarize.py .gpu-results > "$OUT/bench.md" 2>&1; tail -40 "$OUT/bench.md"
