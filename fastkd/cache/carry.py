"""Per-example teacher outputs one stage's live forwards produce for a later stage (TinyBERT's prediction stage
reads the logits of the teacher its intermediate stage already runs over the same examples).

Why: on a CPU every stage runs one epoch, so a per-stage activation cache is never read; a stage that needs only
the teacher's logits would still pay a full teacher forward per batch (about a third of a bf16 prediction step on
a 2-core CPU). The intermediate stage's forwards compute the logits anyway (the head is a few hundred FLOPs per
example), so they are kept, a few bytes per example, and the later stage reads them instead of running the
teacher. The store is small enough to travel in every checkpoint, so a resumed run reads the same values.
"""

from __future__ import annotations

import torch

from fastkd.cache.store import check_index
from fastkd.terms import seq_dim


def same_examples(source_data: str, target_data: str) -> bool:
    """Whether a stage on ``source_data`` sees every example of ``target_data`` under the same row number: the same
    data, or the augmented data, whose first rows are the task data's, in order (:func:`fastkd.augment.augment`)."""
    return source_data == target_data or (source_data, target_data) == ("augmented", "task")


def fields_to_carry(source: tuple[str, str], fields: list[str], target: tuple[str, str],
                    target_fields: list[str]) -> list[str]:
    """What a stage (``source``: its teacher kind and data, ``fields``: what it captures) keeps for the next one
    (``target``, ``target_fields``): the next stage's fields when it reads the same teacher on the same examples,
    only per-example fields (logits), and this stage runs that teacher anyway; else nothing."""
    if source[0] != target[0] or not same_examples(source[1], target[1]) or not fields or not target_fields:
        return []
    if any(seq_dim(f) is not None for f in target_fields):
        return []  # the next stage needs token-level activations: it runs the teacher (or its own cache)
    return sorted(target_fields)


def start_carry(carry: CarriedOutputs | None, runner, stage, nxt, next_fields: list[str], num_examples: int,
                dtype: torch.dtype, log) -> CarriedOutputs | None:
    """Make ``stage``'s teacher ``runner`` also return what stage ``nxt`` reads (its ``next_fields``, for its
    ``num_examples``), when :func:`fields_to_carry` allows; returns the store to fill (``carry`` itself when a
    resumed stage had one)."""
    fields = list(runner.fields)
    keep = fields_to_carry((stage.teacher, stage.data), fields, (nxt.teacher, nxt.data), next_fields)
    if not keep:
        return carry
    # The same forward also returns them (the head is a few FLOPs per example): no extra teacher pass.
    runner.fields = [*fields, *(f for f in keep if f not in fields)]
    on = "the same data" if stage.data == nxt.data else "its examples (the augmented data's first rows)"
    log(f"teacher: stage {stage.name}'s forwards also keep the teacher's {', '.join(keep)} for stage {nxt.name} on "
        f"{on}, which then runs no teacher at all")
    if carry is None or set(carry.fields) != set(keep):  # else a resumed stage's, from its checkpoint
        # Kept in the teacher's own dtype: the values a live forward would hand the next stage.
        carry = CarriedOutputs(num_examples, keep, dtype)
    carry.source = stage.name
    return carry


def carried_cache(carry: CarriedOutputs | None, fields: list[str], num_examples: int, stage: str,
                  log) -> CarriedOutputs | None:
    """The previous stage's carried outputs as this stage's cache, when they cover its fields and every example
    of its data (under DDP a rank kept only its own examples: the stage then runs the teacher)."""
    if carry is None or not fields or not set(fields) <= set(carry.fields):
        return None
    carry.source = None  # read from now on, never filled again
    if carry.num_examples != num_examples or not carry.complete:
        log(f"teacher: the carried {', '.join(carry.fields)} cover {carry.stats['examples']} of {num_examples} "
            f"examples; stage {stage} runs the teacher")
        return None
    log(f"teacher cache (carried) for stage {stage}: the {', '.join(fields)} of all {num_examples} examples from "
        f"the previous stage's teacher forwards; no teacher forward in this stage")
    return carry


class CarriedOutputs:
    """Per-example fields without a token dimension (``[N, ...]`` rows), filled batch by batch; an
    :class:`fastkd.cache.store.ActivationCache` for the stage that reads them."""

    mode = "carried"

    def __init__(self, num_examples: int, fields: list[str], dtype: torch.dtype):
        self.num_examples, self.fields, self.dtype = num_examples, list(fields), dtype
        self.rows: dict[str, torch.Tensor] = {}
        self.filled = torch.zeros(num_examples, dtype=torch.bool)
        self.hits = self.misses = 0
        self.source: str | None = None  # the stage whose teacher forwards fill it (None: none now)

    @property
    def complete(self) -> bool:
        return bool(self.filled.all())

    def put(self, index: torch.Tensor, lengths: torch.Tensor, tensors: dict[str, torch.Tensor],
            seq_dims: dict | None = None) -> None:
        ids = torch.as_tensor(check_index(index, lengths)[0])
        keep = ids < self.num_examples  # augmented copies (rows past the task data's) are not the next stage's
        ids = ids[keep]
        for name in self.fields:
            t = tensors[name].detach()[keep.to(tensors[name].device)].to("cpu", self.dtype)
            if name not in self.rows:
                self.rows[name] = torch.zeros((self.num_examples, *t.shape[1:]), dtype=self.dtype)
            self.rows[name][ids] = t
        self.filled[ids] = True

    def get(self, index: torch.Tensor, lengths: torch.Tensor, *, count: bool = True) -> dict[str, torch.Tensor] | None:
        ids = torch.as_tensor(check_index(index, lengths)[0])
        if ids.numel() == 0 or int(ids.max()) >= self.num_examples or not bool(self.filled[ids].all()):
            self.misses += count
            return None
        self.hits += count
        return {name: self.rows[name][ids] for name in self.fields}

    def flush(self) -> None:
        pass

    def refresh(self) -> None:
        pass

    @property
    def stats(self) -> dict:
        lookups = self.hits + self.misses
        return {"mode": self.mode, "hits": self.hits, "misses": self.misses,
                "hit_rate": self.hits / lookups if lookups else 0.0, "examples": int(self.filled.sum()),
                "bytes": sum(t.numel() * t.element_size() for t in self.rows.values())}

    def state_dict(self) -> dict:
        return {"fields": self.fields, "filled": self.filled.clone(), "rows": dict(self.rows),
                "dtype": str(self.dtype).removeprefix("torch.")}

    @classmethod
    def from_state(cls, state: dict) -> CarriedOutputs:
        out = cls(len(state["filled"]), state["fields"], getattr(torch, state["dtype"]))
        out.filled, out.rows = state["filled"].clone(), dict(state["rows"])
        return out
