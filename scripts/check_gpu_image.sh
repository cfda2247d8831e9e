#!/usr/bin/env bash
# Replay a GPU session on this CPU, in an environment like the lent GPU's image (Python 3.12, torch 2.11, triton
# 3.6, transformers 5.17; no datasets, no teacher package, fastkd not installed), before device time is spent:
#   1. a clean clone of HEAD plus the carried folders (.whl, .teacher, .data from bench/prepare_gpu_carry.sh),
#   2. bench/gpu_session.sh exactly as the device runs it (kernel tests in the interpreter; bench untimed),
#   3. the rest of the test suite in the same environment (trainer, cache, ETD, DDP on gloo...).
# Usage: bash scripts/check_gpu_image.sh   (needs python3.12; the venv, ~5 GB, goes to $FASTKD_IMAGE_VENV)
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
VENV=${FASTKD_IMAGE_VENV:-$HOME/.cache/fastkd/gpu-image-venv}
WORK=$(mktemp -d)
if [ ! -x "$VENV/bin/python3" ]; then
  python3.12 -m venv "$VENV"
  "$VENV/bin/python3" -m pip install -q -r scripts/gpu_image_requirements.txt
fi
[ -d .whl ] && [ -d .teacher ] || bash bench/prepare_gpu_carry.sh --data
git clone -q "$REPO" "$WORK/repo"
cp -r .whl .teacher "$WORK/repo/" && { [ -d .data ] && cp -r .data "$WORK/repo/" || true; }
cd "$WORK/repo"
export PATH="$VENV/bin:$PATH"
unset VIRTUAL_ENV PYTHONPATH TRITON_INTERPRET FASTKD_TEACHER_DIR
mkdir -p "$WORK/out"
OUT="$WORK/out" FASTKD_BENCH_ARGS="--benchmark-disable" bash bench/gpu_session.sh
# The rest of the suite, with what gpu_session.sh set up (wheels in /tmp/site, the carried teacher and data).
export PYTHONPATH=/tmp/site:$PWD TRITON_INTERPRET=1 HF_HUB_OFFLINE=1 FASTKD_TEACHER_DIR=$PWD/.teacher
export FASTKD_DATA_DIR=$([ -d .data ] && echo "$PWD/.data" || echo "${FASTKD_DATA_DIR:-$REPO/../shared/data}")
kernel_tests=$(printf -- "--deselect tests/%s " test_attention_kl.py test_attention_mse.py test_hidden_mse.py \
  test_sinkhorn.py test_layer_costs.py test_losses.py test_inference_teacher.py)
# shellcheck disable=SC2086
python3 -m pytest tests -q -p no:cacheprovider $kernel_tests 2>&1 | tee "$WORK/out/rest.log" | tail -5
if grep -qE "[0-9]+ (failed|errors?)\b|skipped: |stopped at its" "$WORK"/out/*.log \
   || ! grep -qE "[0-9]+ passed" "$WORK/out/tests.log"; then
  echo "FAILED: logs in $WORK/out"; exit 1
fi
echo "image replay passed: logs in $WORK/out"
