"""The fused losses with teacher tensors made under ``torch.inference_mode`` -- how a frozen teacher runs in fastkd's
trainer and in most distillation loops. Autograd refuses to save inference tensors for backward; the kernels keep
them aside (kernels/saving.py). Gradients must be exactly those of the same values as ordinary tensors."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from fastkd.kernels.attention_kl import attention_kl  # noqa: E402
from fastkd.kernels.attention_mse import attention_mse  # noqa: E402
from fastkd.kernels.hidden_mse import hidden_mse  # noqa: E402

from tests.helpers import DEVICE, make_mask  # noqa: E402


def _attention_inputs(gen):
    B, H, L, d_s, d_t = 2, 3, 19, 16, 8
    student = [torch.randn(B, H, L, d_s, generator=gen).to(DEVICE).requires_grad_() for _ in range(2)]
    teacher = [torch.randn(B, H, L, d_t, generator=gen).to(DEVICE) for _ in range(2)]
    return student, teacher, make_mask("prefix", B, L, gen, DEVICE)


def _hidden_inputs(gen):
    B, L, d_s, d_t = 2, 19, 24, 40
    h_s = torch.randn(B, L, d_s, generator=gen).to(DEVICE).requires_grad_()
    w = torch.randn(d_t, d_s, generator=gen).to(DEVICE).requires_grad_()
    h_t = torch.randn(B, L, d_t, generator=gen).to(DEVICE)
    return [h_s, w], [h_t], make_mask("prefix", B, L, gen, DEVICE)


CASES = {
    "attention_kl": (_attention_inputs, lambda s, t, m: attention_kl(s[0], s[1], t[0], t[1], m)),
    "attention_mse": (_attention_inputs, lambda s, t, m: attention_mse(s[0], s[1], t[0], t[1], m)),
    "hidden_mse": (_hidden_inputs, lambda s, t, m: hidden_mse(s[0], t[0], s[1], None, m)),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_teacher_from_inference_mode(name, gen):
    make, loss_fn = CASES[name]
    student, teacher, mask = make(gen)
    with torch.inference_mode():
        frozen = [t.clone() for t in teacher]  # what a teacher forward under inference mode returns
    assert all(t.is_inference() for t in frozen)
    grads = []
    for t in (teacher, frozen):
        for s in student:
            s.grad = None
        loss = loss_fn(student, t, mask)
        loss.backward()
        grads.append((loss.detach(), [s.grad.clone() for s in student]))
    (loss_a, grads_a), (loss_b, grads_b) = grads
    assert torch.isfinite(loss_a) and torch.equal(loss_a, loss_b)
    for a, b in zip(grads_a, grads_b, strict=True):
        assert torch.equal(a, b) and a.abs().sum() > 0
