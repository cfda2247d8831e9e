#!/usr/bin/env bash
# Create .venv and install fastkd with its dev extras, from nothing. Idempotent and quick when up to date.
# On a machine without an NVIDIA GPU it installs the CPU build of torch first, so pip never pulls a
# multi-GB CUDA build; with a GPU the regular build (or the image's own torch) is used.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${FASTKD_VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  # With a GPU, see the image's torch/triton instead of reinstalling them.
  if command -v nvidia-smi >/dev/null 2>&1 && "$PY" -c "import torch" 2>/dev/null; then
    "$PY" -m venv --system-site-packages "$VENV"
  else
    "$PY" -m venv "$VENV"
  fi
fi
. "$VENV/bin/activate"
stamp="$VENV/.fastkd-installed"
want="$(cat pyproject.toml scripts/bootstrap.sh | sha256sum | cut -c1-16)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
# A full install takes about 3 GB (torch ~1.5 GB, the rest ~1 GB, plus pip's unpacking room in TMPDIR).
# Warn up front, so that pip's "No space left on device" halfway through comes with its reason.
need_mb=3500
if python -c "import torch" 2>/dev/null; then need_mb=1500; fi
for dir in "$VENV" "${TMPDIR:-/tmp}"; do
  free_mb=$(df -Pm "$dir" | awk 'NR==2 {print $4}')
  if [ -n "$free_mb" ] && [ "$free_mb" -lt "$need_mb" ]; then
    echo "bootstrap: warning: only ${free_mb} MB free on the disk of $dir; installing fastkd needs about" \
      "${need_mb} MB (free some space, or point FASTKD_VENV / TMPDIR at a disk with room)" >&2
  fi
done
log="$VENV/pip.log"
# --no-cache-dir: pip's wheel cache would hold a second copy of torch & co. on the same disk.
pipq() { python -m pip install -q --no-cache-dir "$@" >"$log" 2>&1 || { cat "$log"; echo "bootstrap: pip install $* failed" >&2; exit 1; }; }
pipq --upgrade pip
if ! python -c "import torch" 2>/dev/null; then
  # torch==2.13.0 is the CPU build on the project's CPU machines (a local wheel); elsewhere PyPI serves it.
  pipq "${FASTKD_TORCH_SPEC:-torch==2.13.0}"
fi
pipq -e ".[dev]"
python -c "import fastkd, torch, transformers; print('fastkd ready: torch', torch.__version__, '| transformers', transformers.__version__)"
echo "$want" > "$stamp"
