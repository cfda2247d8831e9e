"""Activation capture on the real packaged MiniLM teacher and on a tiny random BERT."""

import math

import pytest
import torch
from transformers import AutoModel, BertModel

from fastkd.models.capture import capture
from fastkd.models.teacher import default_teacher_path
from tests.helpers import tiny_bert_config

SENTENCES = ["a gorgeous , witty , seductive movie .", "the story is n't worth the paper it 's printed on",
             "ok"]


@pytest.fixture(scope="module")
def teacher_inputs():
    from transformers import AutoTokenizer

    path = default_teacher_path()
    tok = AutoTokenizer.from_pretrained(path)
    batch = tok(SENTENCES, padding=True, return_tensors="pt")
    assert not bool(batch["attention_mask"].all()), "the batch must contain padding"
    return path, dict(batch)


def test_captured_qk_reproduce_eager_attention_probs(teacher_inputs):
    path, batch = teacher_inputs
    sdpa = AutoModel.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa").eval()
    eager = AutoModel.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    layers = [0, 2, 5]
    with torch.no_grad():
        out, cap = capture(sdpa, batch, layers, qkv="qkv", embeddings=True)
        ref = eager(**batch, output_attentions=True)
        hs = sdpa(**batch, output_hidden_states=True).hidden_states
    mask = batch["attention_mask"].bool()
    assert sorted(cap.q) == layers and sorted(cap.hidden) == layers
    for i in layers:
        q, k = cap.q[i], cap.k[i]
        assert q.shape == (3, 12, mask.shape[1], 32)
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        assert (probs - ref.attentions[i]).abs().max() < 1e-5
        assert torch.equal(cap.hidden[i], hs[i + 1])
    assert torch.equal(cap.embeddings, hs[0])
    assert torch.equal(out.last_hidden_state, cap.hidden[5])


def test_capture_keeps_only_requested_layers_and_removes_hooks():
    torch.manual_seed(0)
    model = BertModel(tiny_bert_config()).eval()
    ids = torch.randint(0, 128, (2, 7))
    _, cap = capture(model, {"input_ids": ids}, [1], hidden=False, qkv={1: "v", 3: "qk"})
    assert sorted(cap.v) == [1] and sorted(cap.q) == [3] and sorted(cap.k) == [3] and not cap.hidden
    assert cap.embeddings is None
    assert all(not m._forward_hooks for m in model.modules())


def test_capture_student_tensors_carry_grad():
    model = BertModel(tiny_bert_config())
    ids = torch.randint(0, 128, (2, 5))
    _, cap = capture(model, {"input_ids": ids}, [-1], qkv="q")
    cap.q[3].sum().backward()
    assert model.encoder.layer[3].attention.self.query.weight.grad is not None


def test_capture_bad_layer_and_model():
    model = BertModel(tiny_bert_config())
    with pytest.raises(ValueError, match="layers: index 9 out of range"):
        capture(model, {"input_ids": torch.ones(1, 3, dtype=torch.long)}, [9])
    with pytest.raises(ValueError, match="model: model_type None is not a supported encoder family; supported: "):
        capture(torch.nn.Linear(2, 2), {}, [0])
