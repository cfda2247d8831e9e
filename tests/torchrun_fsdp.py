"""One rank of the FSDP test (tests/test_torchrun.py): fastkd.Distiller in a plain loop under FSDP2
(``fully_shard``) on the CPU with gloo; the teacher stays whole and frozen outside the sharded module.

    torchrun --nproc-per-node 2 tests/torchrun_fsdp.py TEACHER_DIR OUT_DIR
"""

from __future__ import annotations

import json
import math
import sys

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from transformers import AutoTokenizer

from fastkd import Distiller
from fastkd.models.encoder import encoder_layers, resized_config
from fastkd.models.teacher import load_model


def main(teacher_dir: str, out: str) -> None:
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    teacher = load_model(teacher_dir, head=True)
    torch.manual_seed(0)
    student = type(teacher)(resized_config(teacher.config, num_layers=2, hidden_size=16, num_heads=4,
                                           intermediate_size=32))
    distiller = Distiller(teacher, student, "tinybert")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for layer in encoder_layers(distiller.student):
        fully_shard(layer, mesh=mesh)
    fully_shard(distiller, mesh=mesh)
    opt = torch.optim.AdamW(distiller.trainable_parameters(), lr=1e-3)
    torch.manual_seed(1 + dist.get_rank())  # each rank its own batches
    losses = []
    for _ in range(3):
        out_ = distiller(input_ids=torch.randint(5, 25, (4, 9)))
        out_.loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(out_.loss.detach()))
    full = get_model_state_dict(distiller, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    sharded = any(type(p).__name__ == "DTensor" for p in distiller.parameters())
    teacher_whole = not any(type(p).__name__ == "DTensor" for p in teacher.parameters())
    if dist.get_rank() == 0:
        distiller.save_student(f"{out}/student", AutoTokenizer.from_pretrained(teacher_dir), state_dict=full)
    with open(f"{out}/rank{dist.get_rank()}.json", "w") as f:
        json.dump({"losses": losses, "finite": all(math.isfinite(v) for v in losses), "sharded": sharded,
                   "teacher_whole": teacher_whole, "teacher_grad": any(p.requires_grad for p in teacher.parameters()),
                   "full_keys": sorted(full)}, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:3])
