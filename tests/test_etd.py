"""ETD extraction: exactness at full size, equivalence with head/FFN masks, any target size, clear errors,
deterministic rand, impt on planted importance, save/load, RoBERTa and ELECTRA."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn
from transformers import (
    AutoModel,
    BertForSequenceClassification,
    BertModel,
    ElectraConfig,
    ElectraModel,
    GPT2Config,
    GPT2Model,
    RobertaConfig,
    RobertaForSequenceClassification,
    RobertaModel,
)

from fastkd import etd
from fastkd.models.teacher import default_teacher_path
from tests.helpers import rel_err, tiny_bert_config, tiny_family_model

FULL_TINY = dict(num_layers=4, hidden_size=32, num_heads=4, intermediate_size=64)


def _inputs(gen, vocab, B=3, L=11, low=0):
    """Random ids, a padded row and a row with one valid token."""
    ids = torch.randint(low, vocab, (B, L), generator=gen)
    mask = torch.ones(B, L, dtype=torch.long)
    mask[1, 7:] = 0
    mask[2, 1:] = 0
    return dict(input_ids=ids, attention_mask=mask)


def _tiny_bert(gen, cls=BertModel, **overrides):
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
    model = cls(tiny_bert_config(**overrides)).eval()
    with torch.no_grad():  # non-trivial biases and LayerNorm affine params (HF inits them to 0/1)
        for name, p in model.named_parameters():
            if name.endswith("bias") or "LayerNorm" in name:
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return model


def _valid(out, mask):
    return out[mask.bool()]


@pytest.fixture(scope="module")
def minilm():
    model = BertModel.from_pretrained(default_teacher_path(), dtype=torch.float32).eval()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(default_teacher_path())
    batch = tok(["a gripping, funny and moving film", "dull", "it is not a bad movie at all , really"],
                padding=True, return_tensors="pt")
    return model, dict(batch)


# ---------------------------------------------------------------- full size is exact


@pytest.mark.parametrize("strategy", ["rand", "impt"])
@pytest.mark.parametrize("cls", [BertModel, BertForSequenceClassification])
def test_full_size_is_exact_tiny(gen, cls, strategy):
    teacher = _tiny_bert(gen, cls)
    x = _inputs(gen, 128)
    student = etd.extract_student(teacher, strategy=strategy, data=[x], **FULL_TINY).eval()
    assert type(student) is cls
    t_out, s_out = teacher(**x), student(**x)
    for key in ("last_hidden_state", "pooler_output", "logits"):
        if key in t_out:
            assert torch.equal(s_out[key], t_out[key]), key
    assert all(torch.equal(a, b) for a, b in zip(student.state_dict().values(), teacher.state_dict().values(),
                                                 strict=True))


def test_full_size_is_exact_minilm(minilm):
    teacher, x = minilm
    cfg = teacher.config
    student = etd.extract_student(teacher, num_layers=cfg.num_hidden_layers, hidden_size=cfg.hidden_size,
                                  num_heads=cfg.num_attention_heads, intermediate_size=cfg.intermediate_size,
                                  strategy="rand").eval()
    with torch.no_grad():
        assert torch.equal(student(**x).last_hidden_state, teacher(**x).last_hidden_state)


def test_full_size_keeps_dtype_bf16(gen):
    teacher = _tiny_bert(gen).to(torch.bfloat16)
    student = etd.extract_student(teacher, strategy="rand", **FULL_TINY).eval()
    x = _inputs(gen, 128)
    assert next(student.parameters()).dtype == torch.bfloat16
    assert torch.equal(student(**x).last_hidden_state, teacher(**x).last_hidden_state)


# ---------------------------------------------------------------- removing units == masking them


def _head_mask(plan, num_layers, heads):
    mask = torch.zeros(num_layers, heads)
    for i, kept in enumerate(plan.heads):
        mask[i, kept] = 1.0
    return mask


def _ffn_zeroed(teacher, plan):
    """A copy of the teacher with the dropped FFN neurons' weights zeroed (gelu(0) = 0: they contribute 0)."""
    zeroed = copy.deepcopy(teacher)
    F = teacher.config.intermediate_size
    with torch.no_grad():
        for layer, kept in zip(zeroed.base_model.encoder.layer, plan.ffn, strict=True):
            drop = torch.ones(F, dtype=torch.bool)
            drop[kept] = False
            layer.intermediate.dense.weight[drop] = 0
            layer.intermediate.dense.bias[drop] = 0
    return zeroed


@pytest.mark.parametrize("strategy", ["rand", "impt"])
def test_removing_heads_equals_head_mask_tiny(gen, strategy):
    teacher = _tiny_bert(gen)
    x = _inputs(gen, 128)
    # 2 of 4 heads at hidden 32: the head dim grows 8 -> 16 (padded dims must not change the function)
    student, plan = etd.extract_student(teacher, num_layers=4, hidden_size=32, num_heads=2, intermediate_size=64,
                                        strategy=strategy, data=[x], return_plan=True)
    with torch.no_grad(), etd.head_gates(teacher, _head_mask(plan, 4, 4)):
        ref = teacher(**x).last_hidden_state
    out = student.eval()(**x).last_hidden_state
    assert rel_err(_valid(out, x["attention_mask"]), _valid(ref, x["attention_mask"])) < 1e-5
    with torch.no_grad():  # and the mask matters: the unmasked teacher differs
        assert rel_err(teacher(**x).last_hidden_state, ref) > 1e-3


def test_removing_heads_equals_head_mask_minilm(minilm):
    teacher, x = minilm
    student, plan = etd.extract_student(teacher, num_layers=6, hidden_size=384, num_heads=6,
                                        intermediate_size=1536, strategy="rand", seed=3, return_plan=True)
    with torch.no_grad():
        with etd.head_gates(teacher, _head_mask(plan, 6, 12)):
            ref = teacher(**x).last_hidden_state
        out = student.eval()(**x).last_hidden_state
    m = x["attention_mask"]
    assert rel_err(_valid(out, m), _valid(ref, m)) < 1e-5


@pytest.mark.parametrize("strategy", ["rand", "impt"])
def test_removing_ffn_equals_zeroing_tiny(gen, strategy):
    teacher = _tiny_bert(gen)
    x = _inputs(gen, 128)
    student, plan = etd.extract_student(teacher, num_layers=4, hidden_size=32, num_heads=4, intermediate_size=23,
                                        strategy=strategy, data=[x], return_plan=True)
    with torch.no_grad():
        ref = _ffn_zeroed(teacher, plan)(**x).last_hidden_state
        gates = torch.zeros(4, 64)
        for i, kept in enumerate(plan.ffn):
            gates[i, kept] = 1
        with etd.ffn_gates(teacher, gates):
            gated = teacher(**x).last_hidden_state
        out = student.eval()(**x).last_hidden_state
    m = x["attention_mask"]
    assert rel_err(_valid(out, m), _valid(ref, m)) < 1e-6
    assert rel_err(_valid(gated, m), _valid(ref, m)) < 1e-6


def test_removing_ffn_equals_zeroing_minilm(minilm):
    teacher, x = minilm
    student, plan = etd.extract_student(teacher, num_layers=6, hidden_size=384, num_heads=12,
                                        intermediate_size=500, strategy="rand", seed=1, return_plan=True)
    with torch.no_grad():
        ref = _ffn_zeroed(teacher, plan)(**x).last_hidden_state
        out = student.eval()(**x).last_hidden_state
    m = x["attention_mask"]
    assert rel_err(_valid(out, m), _valid(ref, m)) < 1e-5


def test_depth_heads_ffn_together_equal_masked_layer_subset(gen):
    teacher = _tiny_bert(gen, num_hidden_layers=6)
    x = _inputs(gen, 128)
    student, plan = etd.extract_student(teacher, num_layers=3, hidden_size=32, num_heads=2, intermediate_size=40,
                                        strategy="impt", data=[x, _inputs(gen, 128)], return_plan=True)
    assert plan.layers == [0, 2, 4]
    sub = copy.deepcopy(teacher)
    sub.encoder.layer = nn.ModuleList([sub.encoder.layer[i] for i in plan.layers])
    sub.config.num_hidden_layers = 3
    sub = _ffn_zeroed(sub, plan)
    with torch.no_grad(), etd.head_gates(sub, _head_mask(plan, 3, 4)):
        ref = sub(**x).last_hidden_state
    out = student.eval()(**x).last_hidden_state
    m = x["attention_mask"]
    assert rel_err(_valid(out, m), _valid(ref, m)) < 1e-5


# ---------------------------------------------------------------- any size, the plan's rules


@pytest.mark.parametrize("sizes", [
    dict(num_layers=1, hidden_size=4, num_heads=1, intermediate_size=1),     # head dim 8 -> 4
    dict(num_layers=3, hidden_size=24, num_heads=4, intermediate_size=40),   # head dim 8 -> 6
    dict(num_layers=2, hidden_size=30, num_heads=3, intermediate_size=64),   # head dim 8 -> 10 (padded)
    dict(num_layers=4, hidden_size=28, num_heads=1, intermediate_size=17),   # one head of 28 (padded)
    dict(num_layers=4, hidden_size=32, num_heads=4, intermediate_size=63),
])
@pytest.mark.parametrize("strategy", ["rand", "impt"])
def test_any_target_size(gen, sizes, strategy):
    teacher = _tiny_bert(gen, BertForSequenceClassification, num_labels=3)
    x = _inputs(gen, 128)
    x_l = dict(x, labels=torch.tensor([0, 2, 1]))
    student, plan = etd.extract_student(teacher, strategy=strategy, data=[x_l], return_plan=True, **sizes)
    cfg = student.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.intermediate_size) == tuple(
        sizes.values())
    out = student.eval()(**x)
    assert out.logits.shape == (3, 3) and torch.isfinite(out.logits).all()
    D, H = sizes["hidden_size"], sizes["num_heads"]
    d_s, d_t = D // H, 8
    hid = plan.hidden
    assert hid.tolist() == sorted(set(hid.tolist())) and len(hid) == D
    # embeddings, pooler and classifier are the teacher's at the kept hidden dims
    tw, sw = teacher.bert.embeddings.word_embeddings.weight, student.bert.embeddings.word_embeddings.weight
    assert torch.equal(sw, tw[:, hid])
    assert torch.equal(student.bert.pooler.dense.weight, teacher.bert.pooler.dense.weight[hid][:, hid])
    assert torch.equal(student.classifier.weight, teacher.classifier.weight[:, hid])
    # per layer: Q and K keep the same dims of each kept head; FFN rows are the teacher's kept rows
    for i, li in enumerate(plan.layers):
        t_l, s_l = teacher.bert.encoder.layer[li], student.bert.encoder.layer[i]
        assert torch.equal(s_l.intermediate.dense.weight, t_l.intermediate.dense.weight[plan.ffn[i]][:, hid])
        keep = min(d_s, d_t)
        rows = (plan.heads[i][:, None] * d_t + plan.qk_dims[i]).flatten()
        s_k = s_l.attention.self.key.weight.view(H, d_s, D)[:, :keep].reshape(-1, D)
        assert torch.equal(s_k, t_l.attention.self.key.weight[rows][:, hid])
        s_q = s_l.attention.self.query.weight.view(H, d_s, D)[:, :keep].reshape(-1, D)
        scale = (d_s / d_t) ** 0.5 if d_s > d_t else 1.0
        torch.testing.assert_close(s_q, t_l.attention.self.query.weight[rows][:, hid] * scale)
        if d_s > d_t:  # padded dims: zero Q rows, zero attention-output columns, random (nonzero) K rows
            pad_q = s_l.attention.self.query.weight.view(H, d_s, D)[:, keep:]
            pad_k = s_l.attention.self.key.weight.view(H, d_s, D)[:, keep:]
            pad_o = s_l.attention.output.dense.weight.view(D, H, d_s)[:, :, keep:]
            assert not pad_q.any() and not pad_o.any() and pad_k.abs().min() > 0


def test_explicit_layers(gen):
    teacher = _tiny_bert(gen)
    student, plan = etd.extract_student(teacher, num_layers=2, hidden_size=32, num_heads=4, intermediate_size=64,
                                        strategy="rand", layers=[1, 3], return_plan=True)
    assert plan.layers == [1, 3]
    assert torch.equal(student.encoder.layer[1].output.dense.weight, teacher.encoder.layer[3].output.dense.weight)


def test_uniform_layers():
    assert etd.uniform_layers(6, 3) == [0, 2, 4]
    assert etd.uniform_layers(12, 4) == [0, 3, 6, 9]
    assert etd.uniform_layers(6, 4) == [0, 1, 3, 4]
    assert etd.uniform_layers(6, 6) == list(range(6))


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_layers=5), "num_layers: expected at most the teacher's num_hidden_layers"),
    (dict(num_layers=0), "num_layers: expected a positive int"),
    (dict(hidden_size=64), "hidden_size: expected at most the teacher's hidden_size"),
    (dict(hidden_size=30), "hidden_size: expected a multiple of num_heads=4"),
    (dict(num_heads=8, hidden_size=32), "num_heads: expected at most the teacher's num_attention_heads"),
    (dict(intermediate_size=65), "intermediate_size: expected at most"),
    (dict(intermediate_size=0), "intermediate_size: expected a positive int"),
    (dict(num_heads=2.0), "num_heads: expected a positive int"),
    (dict(strategy="magnitude"), "strategy: expected one of"),
    (dict(strategy="impt"), "data: strategy 'impt' needs"),
    (dict(seed="x"), "seed: expected an int"),
    (dict(num_layers=2, layers=[0, 4]), "layers: expected 2 increasing distinct teacher layer indices"),
    (dict(num_layers=2, layers=[2, 1]), "layers: expected 2 increasing"),
    (dict(num_layers=2, layers=[1]), "layers: expected 2 increasing"),
])
def test_impossible_targets_raise(gen, kwargs, match):
    teacher = _tiny_bert(gen)
    args = dict(FULL_TINY, strategy="rand") | kwargs
    with pytest.raises(ValueError, match=match):
        etd.extract_student(teacher, **args)


def test_bad_inputs_raise(gen):
    teacher = _tiny_bert(gen)
    x = _inputs(gen, 128)
    with pytest.raises(ValueError, match="teacher: model_type 'gpt2' is not a supported encoder family"):
        etd.extract_student(GPT2Model(GPT2Config(n_layer=1, n_embd=16, n_head=2)), strategy="rand", **FULL_TINY)
    mobile = tiny_family_model("mobilebert")  # supported for capture, not for extraction
    with pytest.raises(ValueError, match="ETD is defined here for .*; not for a mobilebert model: its bottleneck "
                                         ".* Use --etd none .* or --student DIR"):
        etd.extract_student(mobile, strategy="rand", **FULL_TINY)
    with pytest.raises(ValueError, match="teacher: expected a transformers BERT-family model"):
        etd.extract_student(nn.Linear(3, 3), strategy="rand", **FULL_TINY)
    with pytest.raises(ValueError, match="gates: expected a tensor of shape"):
        with etd.head_gates(teacher, torch.ones(4, 3)):
            pass
    with pytest.raises(ValueError, match="objective: expected one of"):
        etd.extract_student(teacher, strategy="impt", data=[x], objective="mlm", **FULL_TINY)
    with pytest.raises(ValueError, match="objective: 'task' needs"):  # no task head
        etd.extract_student(teacher, strategy="impt", data=[x], objective="task", **FULL_TINY)
    with pytest.raises(ValueError, match="num_batches: expected a positive int"):
        etd.extract_student(teacher, strategy="impt", data=[x], num_batches=0, **FULL_TINY)
    with pytest.raises(ValueError, match="data: expected batches that are dicts"):
        etd.extract_student(teacher, strategy="impt", data=[x["input_ids"]], **FULL_TINY)
    with pytest.raises(ValueError, match="data: expected at least one batch"):
        etd.extract_student(teacher, strategy="impt", data=[], **FULL_TINY)


def test_non_finite_importance_is_an_error(gen):
    teacher = _tiny_bert(gen)
    with torch.no_grad():
        teacher.encoder.layer[1].intermediate.dense.weight[3, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        etd.extract_student(teacher, strategy="impt", data=[_inputs(gen, 128)], **FULL_TINY)
    assert not teacher.training and all(p.requires_grad for p in teacher.parameters())  # state restored


# ---------------------------------------------------------------- strategies


def test_rand_is_deterministic_for_a_seed(gen):
    teacher = _tiny_bert(gen)
    sizes = dict(num_layers=2, hidden_size=20, num_heads=2, intermediate_size=30)
    a = etd.extract_student(teacher, strategy="rand", seed=5, **sizes)
    b = etd.extract_student(teacher, strategy="rand", seed=5, **sizes)
    c = etd.extract_student(teacher, strategy="rand", seed=6, **sizes)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def _plant(teacher, gen, *, weak_heads=(), weak_ffn=(), dead_hidden=()):
    """Make some heads / FFN neurons nearly irrelevant (scaled by 1e-3) and some hidden dims dead (every
    parameter carrying them zero), in every layer."""
    base = teacher.base_model
    d = teacher.config.hidden_size // teacher.config.num_attention_heads
    with torch.no_grad():
        for layer in base.encoder.layer:
            for h in weak_heads:
                layer.attention.self.value.weight[h * d:(h + 1) * d] *= 1e-3
                layer.attention.self.value.bias[h * d:(h + 1) * d] *= 1e-3
            for f in weak_ffn:
                layer.intermediate.dense.weight[f] *= 1e-3
                layer.intermediate.dense.bias[f] *= 1e-3
                layer.output.dense.weight[:, f] *= 1e-3
            for j in dead_hidden:
                for lin in (layer.attention.output.dense, layer.output.dense):
                    lin.weight[j] = 0
                    lin.bias[j] = 0
                for norm in (layer.attention.output.LayerNorm, layer.output.LayerNorm):
                    norm.weight[j] = 0
                    norm.bias[j] = 0
        emb = base.embeddings
        for j in dead_hidden:
            for table in (emb.word_embeddings, emb.position_embeddings, emb.token_type_embeddings):
                table.weight[:, j] = 0
            emb.LayerNorm.weight[j] = 0
            emb.LayerNorm.bias[j] = 0
            if getattr(base, "pooler", None) is not None:
                base.pooler.dense.weight[j] = 0
                base.pooler.dense.bias[j] = 0


@pytest.mark.parametrize("cls", [BertModel, BertForSequenceClassification])
def test_impt_keeps_the_planted_units(gen, cls):
    teacher = _tiny_bert(gen, cls)
    _plant(teacher, gen, weak_heads=(1, 3), weak_ffn=tuple(range(0, 64, 3)), dead_hidden=(2, 7, 11, 20))
    data = []
    for _ in range(3):
        x = _inputs(gen, 128, B=4)
        x["labels"] = torch.randint(0, 2, (4,), generator=gen)
        data.append(x)
    imp = etd.compute_importance(teacher, data)
    assert imp.objective == ("task" if cls is BertForSequenceClassification else "sensitivity")
    assert imp.num_batches == 3
    assert torch.all(imp.hidden[[2, 7, 11, 20]] == 0) and torch.all(imp.hidden[[0, 1, 3, 31]] > 0)
    _, plan = etd.extract_student(teacher, num_layers=4, hidden_size=28, num_heads=2, intermediate_size=42,
                                  strategy="impt", importance=imp, return_plan=True)
    assert sorted(set(range(32)) - set(plan.hidden.tolist())) == [2, 7, 11, 20]
    strong_ffn = [f for f in range(64) if f % 3]
    for heads, ffn in zip(plan.heads, plan.ffn, strict=True):
        assert heads.tolist() == [0, 2]
        assert ffn.tolist() == strong_ffn
    # rand, by contrast, does not know: with this seed it drops some strong units
    _, rplan = etd.extract_student(teacher, num_layers=4, hidden_size=28, num_heads=2, intermediate_size=42,
                                   strategy="rand", return_plan=True)
    assert any(f.tolist() != strong_ffn for f in rplan.ffn)


def test_importance_restores_teacher_state(gen):
    teacher = _tiny_bert(gen).train()
    teacher.embeddings.word_embeddings.weight.requires_grad_(False)
    etd.compute_importance(teacher, [_inputs(gen, 128)])
    assert teacher.training and not teacher.embeddings.word_embeddings.weight.requires_grad
    assert all(p.grad is None for p in teacher.parameters())


# ---------------------------------------------------------------- save / load, CLI, other families


def test_cli_writes_a_loadable_student(tmp_path, minilm):
    teacher, x = minilm
    out = tmp_path / "student"
    assert etd.main(["--teacher", "default", "--layers", "2", "--hidden", "192", "--heads", "6", "--ffn", "300",
                     "--strategy", "impt", "--task", "sst2", "--num-batches", "2", "--batch-size", "4",
                     "--out", str(out)]) == 0
    loaded = AutoModel.from_pretrained(out).eval()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    assert isinstance(loaded, BertModel)
    assert (loaded.config.num_hidden_layers, loaded.config.hidden_size, loaded.config.num_attention_heads,
            loaded.config.intermediate_size) == (2, 192, 6, 300)
    with torch.no_grad():
        h = loaded(**tok(["a fine film"], return_tensors="pt")).last_hidden_state
    assert h.shape[-1] == 192 and torch.isfinite(h).all()
    assert (out / "etd_plan.json").is_file()


def test_cli_teacher_layers_picks_the_kept_layers(tmp_path, minilm, capsys):
    teacher, x = minilm
    out = tmp_path / "student"
    assert etd.main(["--teacher", "default", "--layers", "3", "--hidden", "384", "--heads", "12", "--ffn", "1536",
                     "--strategy", "rand", "--teacher-layers", "1,3,5", "--out", str(out)]) == 0
    assert json.loads((out / "etd_plan.json").read_text())["plan"]["layers"] == [1, 3, 5]
    loaded = AutoModel.from_pretrained(out, dtype=torch.float32)
    # full width kept: student layer i is teacher layer [1, 3, 5][i], weight for weight
    t_sd = teacher.state_dict()
    for i, t in enumerate([1, 3, 5]):
        w = loaded.encoder.layer[i].attention.self.query.weight
        assert torch.equal(w, t_sd[f"encoder.layer.{t}.attention.self.query.weight"])
    with pytest.raises(SystemExit):
        etd.main(["--layers", "3", "--hidden", "384", "--heads", "12", "--ffn", "1536", "--strategy", "rand",
                  "--teacher-layers", "1;3;5", "--out", str(tmp_path / "x")])
    assert "--teacher-layers: expected comma-separated" in capsys.readouterr().err


def test_text_batches_of_sentence_pairs_carry_segment_ids():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(default_teacher_path())
    batch = next(etd.text_batches(tok, ["a fine film", "dull"], text_pairs=["it is", "so very dull"], labels=[1, 0]))
    expected = tok(["a fine film", "dull"], ["it is", "so very dull"], padding=True, return_tensors="pt")
    assert torch.equal(batch["token_type_ids"], expected["token_type_ids"])
    assert int(batch["token_type_ids"].sum()) > 0 and batch["labels"].tolist() == [1, 0]


def test_saved_student_round_trips(tmp_path, gen):
    teacher = _tiny_bert(gen, BertForSequenceClassification, num_labels=2)
    student = etd.extract_student(teacher, num_layers=2, hidden_size=24, num_heads=3, intermediate_size=20,
                                  strategy="rand").eval()
    student.save_pretrained(tmp_path)
    loaded = AutoModel.from_pretrained(tmp_path).eval()  # the encoder of the saved classifier
    x = _inputs(gen, 128)
    with torch.no_grad():
        assert torch.equal(loaded(**x).last_hidden_state, student.bert(**x).last_hidden_state)


def _roberta(gen, cls):
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
    cfg = RobertaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                        intermediate_size=48, max_position_embeddings=40, pad_token_id=1, num_labels=2,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return cls(cfg).eval()


@pytest.mark.parametrize("cls", [RobertaModel, RobertaForSequenceClassification])
def test_roberta(gen, cls):
    teacher = _roberta(gen, cls)
    x = _inputs(gen, 100, low=3)
    full = etd.extract_student(teacher, num_layers=3, hidden_size=32, num_heads=4, intermediate_size=48,
                               strategy="rand").eval()
    key = "logits" if cls is RobertaForSequenceClassification else "last_hidden_state"
    assert torch.equal(full(**x)[key], teacher(**x)[key])
    student, plan = etd.extract_student(teacher, num_layers=3, hidden_size=32, num_heads=2, intermediate_size=48,
                                        strategy="impt", data=[x], return_plan=True)
    assert type(student) is cls
    with torch.no_grad(), etd.head_gates(teacher, _head_mask(plan, 3, 4)):
        ref = teacher(**x)[key]
    assert rel_err(student.eval()(**x)[key], ref) < 1e-5
    small = etd.extract_student(teacher, num_layers=2, hidden_size=16, num_heads=4, intermediate_size=10,
                                strategy="impt", data=[x]).eval()
    assert torch.isfinite(small(**x)[key]).all()


@pytest.mark.parametrize("embedding_size", [16, 32])
def test_electra(gen, embedding_size):
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
    cfg = ElectraConfig(vocab_size=100, embedding_size=embedding_size, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=4, intermediate_size=40, max_position_embeddings=40,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    teacher = ElectraModel(cfg).eval()
    x = _inputs(gen, 100)
    full = etd.extract_student(teacher, num_layers=2, hidden_size=32, num_heads=4, intermediate_size=40,
                               strategy="rand").eval()
    assert torch.equal(full(**x).last_hidden_state, teacher(**x).last_hidden_state)
    student = etd.extract_student(teacher, num_layers=1, hidden_size=24, num_heads=2, intermediate_size=7,
                                  strategy="impt", data=[x]).eval()
    assert student.config.embedding_size == (embedding_size if embedding_size != 32 else 24)
    h = student(**x).last_hidden_state
    assert h.shape == (3, 11, 24) and torch.isfinite(h).all()
    if embedding_size == 16:
        with pytest.raises(ValueError, match="hidden_size: this teacher projects embeddings"):
            etd.extract_student(teacher, num_layers=1, hidden_size=16, num_heads=2, intermediate_size=7,
                                strategy="rand")
