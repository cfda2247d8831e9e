"""Run the same seeded short CPU trainings at two commits and compare their metrics.jsonl bit for bit.

    python scripts/compare_metrics.py BASE_REV            # BASE_REV (in a temporary git worktree) vs this checkout
    python scripts/compare_metrics.py BASE_REV --methods tinybert bert-emd kd --hf-methods tinybert

Every method runs through ``python -m fastkd.train`` and through ``fastkd.distill.hf.DistillationTrainer`` by default.

Each tree runs ``python -m fastkd.train`` from its own source (PYTHONPATH) with its own fastkd cache folder, so
the teacher's fine-tune is redone by each tree's code too. Every record's loss fields (``loss``, ``loss_*``),
the learning rate, BERT-EMD's layer weights and the dev accuracy must be equal as written (the JSON text of a
float is its exact value). Exits 1 on any difference, printing the first ones. A refactor that claims "no
behaviour change" runs this against the commit before it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Small enough for a 2-core CPU (about a minute a run), large enough to cross an epoch boundary with the
# memory cache in use (epoch 2 reads it), a dev evaluation and a checkpoint.
RUN_ARGS = ["--max-train-examples", "160", "--max-dev-examples", "48", "--finetune-examples", "160",
            "--epochs", "2", "--max-length", "48", "--batch-size", "16", "--log-every", "1", "--latency-runs", "1",
            "--seed", "0", "--cache", "memory", "--no-progress", "--etd", "impt"]
METHODS = ["kd", "tinybert", "minilm", "minilmv2", "pkd-last", "pkd-skip", "bert-emd", "ernie-tiny"]
# fastkd.distill.hf.DistillationTrainer on the tests' tiny teacher and task (each tree's own tests/helpers.py), two
# epochs per stage; its log_history's loss fields are compared the same way.
HF_SCRIPT = """
import json, sys, torch
from pathlib import Path
from transformers import AutoTokenizer, TrainingArguments
from fastkd.data import load_texts
from fastkd.hf import DistillationTrainer  # a public path in every layout
try:
    from fastkd.models.encoder import resized_config
    from fastkd.models.teacher import load_model
except ImportError:  # a tree from before the subpackages
    from fastkd.encoder import resized_config
    from fastkd.teacher import load_model
from tests.helpers import make_teacher, write_task
work, method = Path(sys.argv[1]), sys.argv[2]
teacher_dir, data = make_teacher(work / "teacher"), write_task(work / "data")
teacher = load_model(teacher_dir, head=True)
torch.manual_seed(0)
student = type(teacher)(resized_config(teacher.config, num_layers=2, hidden_size=16, num_heads=4,
                                       intermediate_size=64))
args = TrainingArguments(str(work / "out"), per_device_train_batch_size=16, logging_steps=1, report_to="none",
                         save_strategy="no", use_cpu=True, disable_tqdm=True, seed=0, eval_strategy="epoch")
extra = {"general_dataset": load_texts(str(data / "train.tsv"))} if method == "ernie-tiny" else {}
trainer = DistillationTrainer(model=student, teacher_model=teacher, method=method, args=args, epochs=2,
                              train_dataset=load_texts(str(data / "train.tsv")),
                              eval_dataset=load_texts(str(data / "dev.tsv")),
                              processing_class=AutoTokenizer.from_pretrained(teacher_dir), max_length=24, **extra)
trainer.train()
print(json.dumps([r for stage in trainer.stage_logs.values() for r in stage]))
"""
COMPARED = ("loss", "lr", "dev_acc", "emd_w_s", "emd_w_t", "step", "stage", "epoch", "event")


def run(tree: Path, method: str, work: Path) -> list[dict]:
    out = work / f"{method}-out"
    env = {**os.environ, "PYTHONPATH": str(tree), "FASTKD_CACHE_DIR": str(work / "cache"),
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.setdefault("FASTKD_DATA_DIR", str(REPO.parent / "shared" / "data"))
    cmd = [sys.executable, "-m", "fastkd.train", "--method", method, "--output-dir", str(out), *RUN_ARGS]
    proc = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"{tree}: {' '.join(cmd[1:])} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def run_hf(tree: Path, method: str, work: Path) -> list[dict]:
    env = {**os.environ, "PYTHONPATH": str(tree), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    work.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run([sys.executable, "-c", HF_SCRIPT, str(work / f"hf-{method}"), method], cwd=tree, env=env,
                          capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"{tree}: DistillationTrainer {method} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    # Loss fields only: the tags of a record's keys (a stage prefix) may change; its values and order may not.
    return [{k.rsplit("/", 1)[-1]: v for k, v in r.items() if "loss" in k and "runtime" not in k}
            for r in json.loads(proc.stdout.strip().splitlines()[-1])]


def compared(rec: dict) -> dict:
    return {k: v for k, v in rec.items() if k.startswith(COMPARED)}


def compare(method: str, base: list[dict], new: list[dict]) -> list[str]:
    """Every record's compared fields equal as written (loss fields: a key is compared by its last part)."""
    diffs = []
    if len(base) != len(new):
        diffs.append(f"{method}: {len(base)} records at the base, {len(new)} now")
    for i, (a, b) in enumerate(zip(base, new, strict=False)):
        a, b = compared(a), compared(b)
        if a != b:
            keys = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
            diffs.append(f"{method} record {i}: " + ", ".join(f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in keys))
    return diffs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("base", help="the commit to compare against (e.g. HEAD~3)")
    ap.add_argument("--methods", nargs="*", default=METHODS)
    ap.add_argument("--hf-methods", nargs="*", default=METHODS, help="methods also run through DistillationTrainer")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="fastkd-compare-") as tmp:
        tmp = Path(tmp)
        base_tree = tmp / "base"
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(base_tree), args.base],
                       check=True, capture_output=True)
        try:
            failures = []
            for method in args.methods:
                base = run(base_tree, method, tmp / "base-work")
                new = run(REPO, method, tmp / "new-work")
                diffs = compare(method, base, new)
                losses = sum(1 for r in new for k in r if k.startswith("loss"))
                print(f"{method}: {len(new)} records, {losses} loss values; "
                      + ("bit-identical" if not diffs else f"{len(diffs)} records differ"))
                failures += diffs
            for method in args.hf_methods:
                base = run_hf(base_tree, method, tmp / "base-work")
                new = run_hf(REPO, method, tmp / "new-work")
                diffs = compare(f"hf {method}", base, new)
                print(f"DistillationTrainer {method}: {len(new)} records; "
                      + ("bit-identical" if not diffs else f"{len(diffs)} records differ"))
                failures += diffs
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(base_tree)],
                           capture_output=True)
    for d in failures[:20]:
        print("  " + d)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
