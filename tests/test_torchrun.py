"""``torchrun --nproc-per-node 2`` on the CPU (gloo): fastkd.train and fastkd.distill.hf.DistillationTrainer, each
through the launcher users run, with the Trainer's own DDP (accelerate) for the latter."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.train_support import args_for, read_metrics

HERE = Path(__file__).resolve().parent


def _torchrun(*argv: str, timeout: int = 300) -> subprocess.CompletedProcess:
    from tests.test_train_ddp import _free_port

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parent)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(_free_port()), *argv]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=HERE.parent)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


@pytest.mark.slow
def test_torchrun_fastkd_train(tiny, tmp_path):
    out = tmp_path / "run"
    _torchrun("-m", "fastkd.train", *args_for(tiny, out, "tinybert", "--cache", "disk", "--cache-dir",
                                              str(tmp_path / "cache")))
    recs = read_metrics(out)
    assert any("loss_att_mse" in r for r in recs) and any(r.get("event") == "final" for r in recs)
    assert (out / "student" / "model.safetensors").is_file()


@pytest.mark.slow
def test_torchrun_distillation_trainer(tiny, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification

    out = tmp_path / "hf"
    _torchrun(str(HERE / "torchrun_hf.py"), str(tiny["teacher"]), str(tiny["data"]), str(out))
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    assert all(r["world"] == 2 and r["wrapped"] == "DistributedDataParallel" for r in ranks)
    assert ranks[0]["digest"] == ranks[1]["digest"]  # DDP kept student and projection identical on both ranks
    assert any(k.startswith("fit.") for k in ranks[0]["digest"])
    assert not any(r["teacher_grad"] for r in ranks)
    assert ranks[0]["stages"] == ["intermediate", "prediction"]
    saved = load_file(out / "student" / "model.safetensors")
    assert not any(k.startswith(("fit.", "emd_w", "student.", "module.")) for k in saved)
    AutoModelForSequenceClassification.from_pretrained(out / "student")


@pytest.mark.slow
def test_torchrun_distiller_under_fsdp2(tiny, tmp_path):
    """torch's FSDP2 runs on the CPU (gloo), so the Distiller is tested under it in a plain loop. The HF Trainer's
    FSDP is not: on a CPU transformers 5 silently trains with DDP instead (Trainer.is_fsdp_enabled is False) and
    FSDP1's accelerate plugin refuses ("no available devices"); that path needs a GPU."""
    from transformers import AutoModelForSequenceClassification

    out = tmp_path / "fsdp"
    out.mkdir()
    _torchrun(str(HERE / "torchrun_fsdp.py"), str(tiny["teacher"]), str(out))
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    assert all(r["finite"] and r["sharded"] and r["teacher_whole"] and not r["teacher_grad"] for r in ranks)
    assert ranks[0]["losses"] != ranks[1]["losses"]  # different batches per rank, one sharded model
    assert any(k.startswith("fit.") for k in ranks[0]["full_keys"])
    reloaded = AutoModelForSequenceClassification.from_pretrained(out / "student")
    assert all(not k.startswith(("fit.", "student.")) for k in reloaded.state_dict())
