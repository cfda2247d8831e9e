"""The training engine shared by the trainer and the teacher fine-tune: batches, schedule, evaluation, DDP."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn

from fastkd.batching import LengthBucketSampler, collate, make_loader


class NonFiniteLossError(FloatingPointError):
    pass


# ---------------------------------------------------------------- batches


def batches_for_epoch(sampler: LengthBucketSampler, dataset, pad_token_id: int, *, num_workers: int = 0,
                      pin_memory: bool = False):
    """Collated, dynamically padded batches for the sampler's current epoch (from its resume point).

    Creating a DataLoader iterator draws a seed from the global torch RNG; that draw is undone so an epoch
    resumed mid-way sees the same dropout masks as an uninterrupted run (the RNG state is checkpointed)."""
    rng = torch.get_rng_state()
    it = iter(make_loader(dataset, sampler, pad_token_id, num_workers=num_workers, pin_memory=pin_memory))
    torch.set_rng_state(rng)
    return it


def lr_lambda(total_steps: int, warmup_steps: int):
    def f(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return f

# ---------------------------------------------------------------- distributed helpers


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed() -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    import torch.distributed as dist

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend)
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
    return Dist(dist.get_rank(), world, local)


# ---------------------------------------------------------------- evaluation and latency


@torch.no_grad()
def evaluate(model: nn.Module, dataset, batch_size: int, device, pad_token_id: int) -> float:
    """Accuracy of a sequence-classification model on a tokenised, labelled dataset."""
    was_training = model.training
    model.eval()
    lengths = list(dataset["length"])
    order = sorted(range(len(dataset)), key=lambda i: lengths[i])
    correct = 0
    for c in range(0, len(order), batch_size):
        idx = order[c:c + batch_size]
        rows = dataset[idx]
        starts = rows.get("type_start") or [None] * len(idx)
        batch = collate([{"index": i, "input_ids": rows["input_ids"][j], "label": rows["label"][j],
                          "type_start": starts[j]} for j, i in enumerate(idx)], pad_token_id).to(device)
        logits = model(**batch.model_inputs()).logits
        correct += int((logits.argmax(-1) == batch.labels).sum())
    model.train(was_training)
    return correct / max(1, len(order))


