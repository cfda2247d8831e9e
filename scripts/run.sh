#!/usr/bin/env bash
# Install everything (scripts/bootstrap.sh), then run the main job on the built-in defaults:
# TinyBERT task distillation of the packaged MiniLM teacher on SST-2, student extracted by ETD-Impt.
# Extra arguments go to fastkd.train (python -m fastkd.train --help).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
. "${FASTKD_VENV:-.venv}/bin/activate"
export FASTKD_DATA_DIR="${FASTKD_DATA_DIR:-$(cd .. && pwd)/shared/data}"
export TOKENIZERS_PARALLELISM=false
exec python -m fastkd.train --method tinybert --etd impt "$@"
