"""The frozen teacher at training time: activations from the cache or a live forward."""

from __future__ import annotations

import torch
from torch import nn

from fastkd.capture import capture_fields
from fastkd.terms import seq_dim


class TeacherRunner:
    """Teacher activations for a batch: from the cache when every example is there, else a live forward in
    inference mode (and stored). Counts live forwards (``calls``) so tests can prove the cache is used."""

    def __init__(self, teacher: nn.Module, fields: list[str], cache, device):
        self.teacher, self.fields, self.cache, self.device = teacher, fields, cache, device
        self.calls = 0

    def __call__(self, batch, host=None) -> dict[str, torch.Tensor]:
        """``host``: the batch's CPU copy, so cache look-ups cost no device-to-host sync."""
        if not self.fields:  # the stage's losses need nothing from the teacher: no forward at all
            return {}
        host = batch if host is None else host
        lengths = host.attention_mask.sum(1).cpu()
        if self.cache is not None:
            got = self.cache.get(host.index, lengths)
            if got is not None:
                return {k: v.to(self.device, non_blocking=True) for k, v in got.items()}
        self.calls += 1
        with torch.inference_mode(), capture_fields(self.teacher, self.fields) as read:
            out = read(self.teacher(**batch.model_inputs()))
        if self.cache is not None:
            self.cache.put(host.index, lengths, out, {k: seq_dim(k) for k in out})
        return out
