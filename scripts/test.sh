#!/usr/bin/env bash
# Install everything (scripts/bootstrap.sh), then lint and run the test suite on the CPU.
# Triton kernels run through the interpreter (TRITON_INTERPRET=1) when there is no GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
. "${FASTKD_VENV:-.venv}/bin/activate"
export FASTKD_DATA_DIR="${FASTKD_DATA_DIR:-$(cd .. && pwd)/shared/data}"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if ! command -v nvidia-smi >/dev/null 2>&1; then export TRITON_INTERPRET=1; fi
ruff check .
python -m pytest tests -q -ra "$@"
