"""Saving a fused loss's inputs for its backward pass when some come from ``torch.inference_mode``.

A frozen teacher runs under inference mode (fastkd's trainer does, and so do most distillation loops), and autograd
refuses to ``save_for_backward`` an inference tensor ("Inference tensors cannot be saved for backward"). The teacher's
tensors need no gradient and are never modified in place, so they are kept on ``ctx`` as they are; the rest goes
through ``save_for_backward`` with its version checks.
"""

from __future__ import annotations

import torch


def save_for_backward(ctx, *tensors: torch.Tensor | None) -> None:
    ctx.inference_inputs = {i: t for i, t in enumerate(tensors) if t is not None and t.is_inference()}
    ctx.save_for_backward(*(None if i in ctx.inference_inputs else t for i, t in enumerate(tensors)))


def saved_tensors(ctx) -> tuple[torch.Tensor | None, ...]:
    return tuple(ctx.inference_inputs.get(i, t) for i, t in enumerate(ctx.saved_tensors))
