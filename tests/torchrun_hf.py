"""One rank of the torchrun test (tests/test_torchrun.py): TinyBERT through fastkd.distill.hf.DistillationTrainer.

    torchrun --nproc-per-node 2 tests/torchrun_hf.py TEACHER_DIR DATA_DIR OUT_DIR
"""

from __future__ import annotations

import json
import os
import sys

import torch
from transformers import AutoTokenizer, TrainingArguments

from fastkd.data import load_texts
from fastkd.distill.hf import DistillationTrainer
from fastkd.models.encoder import resized_config
from fastkd.models.teacher import load_model


def main(teacher_dir: str, data_dir: str, out: str) -> None:
    torch.set_num_threads(1)
    teacher = load_model(teacher_dir, head=True)
    torch.manual_seed(0)
    student = type(teacher)(resized_config(teacher.config, num_layers=2, hidden_size=16, num_heads=4,
                                           intermediate_size=32))
    args = TrainingArguments(out, per_device_train_batch_size=8, logging_steps=1, report_to="none", use_cpu=True,
                             ddp_backend="gloo", save_strategy="epoch", disable_tqdm=True, seed=0)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, method="tinybert", args=args, epochs=1,
                                  train_dataset=load_texts(f"{data_dir}/train.tsv"),
                                  processing_class=AutoTokenizer.from_pretrained(teacher_dir), max_length=24)
    trainer.train()
    trainer.save_model(f"{out}/student")
    rank = int(os.environ["RANK"])
    digest = {k: float(v.double().sum()) for k, v in trainer.distiller.state_dict().items()}
    wrapped = type(trainer.model_wrapped).__name__
    with open(f"{out}/rank{rank}.json", "w") as f:
        json.dump({"world": trainer.args.world_size, "digest": digest, "wrapped": wrapped,
                   "teacher_grad": any(p.requires_grad for p in teacher.parameters()),
                   "stages": list(trainer.stage_logs)}, f)


if __name__ == "__main__":
    main(*sys.argv[1:4])
