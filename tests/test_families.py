"""Parity of fastkd's capture with each encoder family's own outputs, on tiny random models with peaked
attention, built offline (tests/helpers.py: FAMILY_TYPES, tiny_family_model).

For every family: the captured embedding output and layer outputs equal ``output_hidden_states`` exactly;
where the family's scores are q·kᵀ/√d (after its rotary step), the attention rebuilt from the captured Q and K
equals the model's own eager ``output_attentions`` to fp32 tolerance (1e-5 absolute on probabilities); for the
families whose scores Q and K cannot give (DeBERTa-v2's disentangled terms, MPNet's relative bias) the captured
real scores do, and Q and K alone are checked not to; the attention losses run forward and backward on the
captured tensors, on the torch and the fused path.
"""

from __future__ import annotations

import math

import pytest
import torch

from fastkd import losses
from fastkd.models.capture import capture
from fastkd.models.families import FAMILIES, family_of, ffn_size, sliding_windows
from tests.helpers import FAMILY_TYPES, tiny_family_model

B, L = 2, 13  # odd length; the second sequence is padded from position 9


def _inputs():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 32, (B, L), generator=g)
    mask = torch.ones(B, L, dtype=torch.long)
    mask[1, 9:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _rebuilt_attention(q, k, mask):
    scores = q.double() @ k.double().transpose(-1, -2) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~mask.bool()[:, None, None, :], float("-inf"))
    return scores.softmax(-1)


def test_every_listed_family_is_registered():
    registered = {t for f in FAMILIES.values() for t in f.model_types}
    assert set(FAMILY_TYPES) == registered


@pytest.mark.parametrize("model_type", FAMILY_TYPES)
def test_captured_hidden_states_are_the_models(model_type):
    model = tiny_family_model(model_type, attn="eager")
    n = model.config.num_hidden_layers
    with torch.no_grad():
        out, cap = capture(model, {**_inputs(), "output_hidden_states": True}, embeddings=True)
    assert len(out.hidden_states) == n + 1
    assert torch.equal(cap.embeddings, out.hidden_states[0])
    for i in range(n):
        assert torch.equal(cap.hidden[i], out.hidden_states[i + 1]), f"layer {i}"


@pytest.mark.parametrize("model_type", FAMILY_TYPES)
def test_attention_rebuilt_from_captured_qk_is_the_models(model_type):
    family = FAMILIES[model_type]
    model = tiny_family_model(model_type, attn="eager")
    inputs = _inputs()
    n = model.config.num_hidden_layers
    real = range(n) if family.real_scores else ()
    with torch.no_grad():
        out, cap = capture(model, {**inputs, "output_attentions": True}, qkv="qk", hidden=False, scores=real)
    windows = sliding_windows(model.config)
    keys = inputs["attention_mask"].bool()[:, None, None, :]
    for i, ref in enumerate(out.attentions):
        valid = inputs["attention_mask"].bool()[:, None, :, None].expand_as(ref)  # padded query rows: undefined
        assert float(ref.max()) > 0.3, "the test's attention is not peaked (uniform would be 1/13)"
        from_qk = _rebuilt_attention(cap.q[i], cap.k[i], inputs["attention_mask"])
        err_qk = float((from_qk.float() - ref)[valid].abs().max())
        if family.real_scores:  # the real-score path: the model's own scores, then its masked softmax
            probs = cap.scores[i].double().masked_fill(~keys, float("-inf")).softmax(-1)
            assert float((probs.float() - ref)[valid].abs().max()) < 1e-5, f"layer {i}"
            assert err_qk > 1e-3, f"layer {i}: Q/K alone should not give this family's scores ({err_qk})"
        elif i in windows and L > windows[i]:  # a local layer on a batch longer than its window
            assert err_qk > 1e-3, f"layer {i}: expected the window to matter, max error {err_qk}"
        else:
            assert err_qk < 1e-5, f"layer {i}: {err_qk}"


@pytest.mark.parametrize("backend", ["torch", "triton"])  # triton: the fused kernels (the interpreter on a CPU)
@pytest.mark.parametrize("model_type", [t for t in FAMILY_TYPES if FAMILIES[t].scores_from_qk])
def test_attention_losses_run_on_captured_tensors(model_type, backend, monkeypatch):
    monkeypatch.setenv("FASTKD_BACKEND", backend)
    teacher = tiny_family_model(model_type, seed=0)
    student = tiny_family_model(model_type, seed=1).train()
    inputs = _inputs()
    mask = inputs["attention_mask"].bool()
    with torch.no_grad():
        _, t = capture(teacher, inputs, layers=[0], qkv="qk", embeddings=True)
    _, s = capture(student, inputs, layers=[0], qkv="qk", embeddings=True)
    loss = (losses.attention_kl(s.q[0], s.k[0], t.q[0], t.k[0], mask)
            + losses.attention_mse(s.q[0], s.k[0], t.q[0], t.k[0], mask)
            + losses.hidden_mse(s.hidden[0], t.hidden[0], mask=mask)
            + losses.hidden_mse(s.embeddings, t.embeddings, mask=mask))
    loss.backward()
    grads = [p.grad for p in student.parameters() if p.grad is not None]
    assert torch.isfinite(loss) and float(loss) > 0 and grads and all(torch.isfinite(g).all() for g in grads)
    if backend == "triton":  # the fused path gives the reference's value on the same captured tensors
        monkeypatch.setenv("FASTKD_BACKEND", "torch")
        ref = (losses.attention_kl(s.q[0], s.k[0], t.q[0], t.k[0], mask)
               + losses.attention_mse(s.q[0], s.k[0], t.q[0], t.k[0], mask)
               + losses.hidden_mse(s.hidden[0], t.hidden[0], mask=mask)
               + losses.hidden_mse(s.embeddings, t.embeddings, mask=mask))
        assert abs(float(loss) - float(ref)) <= 1e-5 * abs(float(ref))


def test_modernbert_local_layers_are_exact_within_the_window_only():
    model = tiny_family_model("modernbert", attn="eager")
    windows = sliding_windows(model.config)
    assert windows == {1: 9}  # local_attention 16: ±8 positions, so sequences of up to 9 tokens are whole
    assert L > windows[1]  # the parity test above sees layer 1 differ at L = 13
    short = {k: v[:, :9] for k, v in _inputs().items()}
    with torch.no_grad():
        out, cap = capture(model, {**short, "output_attentions": True}, qkv="qk", hidden=False)
    rebuilt = _rebuilt_attention(cap.q[1], cap.k[1], short["attention_mask"])
    valid = short["attention_mask"].bool()[:, None, :, None].expand_as(out.attentions[1])
    assert float((rebuilt.float() - out.attentions[1])[valid].abs().max()) < 1e-5


def test_unsupported_family_is_a_value_error_naming_it():
    from transformers import GPT2Config

    with pytest.raises(ValueError, match=r"model_type 'gpt2' is not a supported encoder family; supported: .*bert"):
        family_of(GPT2Config())


@pytest.mark.parametrize("model_type", [t for t in FAMILY_TYPES if FAMILIES[t].etd])
def test_etd_per_family_full_size_is_exact_and_a_cut_keeps_units(model_type):
    from fastkd import etd

    teacher = tiny_family_model(model_type, layers=3)
    cfg = teacher.config
    x = _inputs()
    full = etd.extract_student(teacher, num_layers=3, hidden_size=cfg.hidden_size, num_heads=4,
                               intermediate_size=ffn_size(cfg), strategy="rand").eval()
    assert type(full) is type(teacher)
    with torch.no_grad():
        assert torch.equal(full(**x).logits, teacher(**x).logits)
    hidden = 16 if FAMILIES[model_type].rotary_head_dim else 24  # RoFormer keeps its head dim (8)
    cut, plan = etd.extract_student(teacher, num_layers=2, hidden_size=hidden, num_heads=2, intermediate_size=40,
                                    strategy="rand", return_plan=True)
    li = len(plan.layers) - 1  # ALBERT: one shared layer, cut once
    t_layer = plan.layers[li]  # a kept layer's FFN rows are the teacher's kept rows and hidden dims
    t_ffn = module_of(teacher, model_type, t_layer)
    s_ffn = module_of(cut, model_type, li)
    halves = t_ffn.weight.chunk(2) if "ffn_in_glu" in FAMILIES[model_type].layer_params.values() else [
        t_ffn.weight]  # GeGLU: a kept unit keeps its row in both halves of Wi
    expect = torch.cat([w[plan.ffn[li]] for w in halves])[:, plan.hidden]
    assert torch.equal(s_ffn.weight, expect)
    # ... and its query rows are the kept heads' kept dims of the teacher's (the first third of a fused Wqkv)
    d_t = cfg.hidden_size // 4
    rows = (plan.heads[li][:, None] * d_t + plan.qk_dims[li]).flatten()
    t_q, s_q = (query_of(m, model_type, i) for m, i in ((teacher, t_layer), (cut, li)))
    if FAMILIES[model_type].rotary_head_dim or hidden // 2 == d_t:
        assert torch.equal(s_q, t_q[rows][:, plan.hidden])
    for suffix, axis in (FAMILIES[model_type].shared_heads or {}).items():  # MPNet: one head set, its bias cut
        assert all(torch.equal(h, plan.heads[0]) for h in plan.heads)
        t_bias = next(v for k, v in teacher.state_dict().items() if k.endswith(suffix))
        s_bias = next(v for k, v in cut.state_dict().items() if k.endswith(suffix))
        assert torch.equal(s_bias, t_bias.index_select(axis, plan.heads[0]))
    if getattr(cfg, "layer_types", None):  # each kept layer keeps its attention type (ModernBERT)
        assert cut.config.layer_types == [cfg.layer_types[j] for j in plan.layers]
    with torch.no_grad():
        assert torch.isfinite(cut.eval()(**x).logits).all()
    # Importance (the task loss through head and FFN gates) works on this family's layout too.
    impt = etd.extract_student(teacher, num_layers=2, hidden_size=hidden, num_heads=2, intermediate_size=40,
                               strategy="impt", data=[{**x, "labels": torch.tensor([0, 1])}], num_batches=1)
    assert type(impt) is type(teacher)


def query_of(model, model_type, i):
    from fastkd.models.families import layer_module, module_at

    params = FAMILIES[model_type].layer_params
    path, part = next((p, k) for p, k in params.items() if k in ("query", "qkv"))
    w = module_at(layer_module(model, FAMILIES[model_type], i), path).weight
    return w.chunk(3)[0] if part == "qkv" else w


def module_of(model, model_type, i):
    from fastkd.models.families import layer_module, module_at

    params = FAMILIES[model_type].layer_params
    ffn_in = next(path for path, part in params.items() if part in ("ffn_in", "ffn_in_glu"))
    return module_at(layer_module(model, FAMILIES[model_type], i), ffn_in)


def test_etd_cuts_deberta_v1_interleaved_in_proj_head_by_head():
    # DeBERTa v1's in_proj rows are [q_h | k_h | v_h] per head, and q_bias / v_bias are separate parameters:
    # each kept head's three blocks and its biases are the teacher's kept dims, re-interleaved.
    from fastkd import etd

    teacher = tiny_family_model("deberta", layers=3)
    cut, plan = etd.extract_student(teacher, num_layers=2, hidden_size=16, num_heads=2, intermediate_size=40,
                                    strategy="rand", return_plan=True)
    d = 8  # the head dim is kept (32/4 = 16/2), so no padding rows
    for li, tl in enumerate(plan.layers):
        t_att, s_att = teacher.deberta.encoder.layer[tl].attention.self, cut.deberta.encoder.layer[li].attention.self
        for j, h in enumerate(plan.heads[li].tolist()):
            for block, dims in enumerate((plan.qk_dims[li][j], plan.qk_dims[li][j], plan.v_dims[li][j])):
                expect = t_att.in_proj.weight[h * 3 * d + block * d + dims][:, plan.hidden]
                assert torch.equal(s_att.in_proj.weight[(3 * j + block) * d:(3 * j + block + 1) * d], expect)
            assert torch.equal(s_att.q_bias[j * d:(j + 1) * d], t_att.q_bias[h * d + plan.qk_dims[li][j]])
            assert torch.equal(s_att.v_bias[j * d:(j + 1) * d], t_att.v_bias[h * d + plan.v_dims[li][j]])
