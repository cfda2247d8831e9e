"""Shared test scaffolding: tiny random models, and the ‖out − ref‖/‖ref‖ measure and padding masks every kernel
test uses. Test modules import from here, never from each other."""

from __future__ import annotations

import math
import os
import random
from pathlib import Path

import torch

# Kernel tests run on the GPU when there is one, else through Triton's interpreter.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
UPSTREAM = 1.7  # the grad of the loss is not 1, so a dropped grad_output factor fails


def tiny_bert_config(**overrides):
    """A tiny random BERT config for tests (seconds per run on a CPU)."""
    from transformers import BertConfig

    cfg = dict(vocab_size=128, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
               intermediate_size=64, max_position_embeddings=64, type_vocab_size=2,
               hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    cfg.update(overrides)
    return BertConfig(**cfg)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in float64."""
    out, ref = out.detach().double(), ref.detach().double()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def make_mask(kind: str, B: int, L: int, gen: torch.Generator, device="cpu") -> torch.Tensor | None:
    """A [B, L] bool padding mask: "none" (None), "prefix" (random lengths), "single" (row 0 has one valid
    token), "holes" (arbitrary valid positions, not a prefix; at least one per row)."""
    if kind == "none":
        return None
    lens = torch.randint(1, L + 1, (B,), generator=gen)
    if kind == "single":
        lens[0] = 1
    m = torch.arange(L)[None] < lens[:, None]
    if kind == "holes":
        m = torch.rand(B, L, generator=gen) < 0.6
        m[torch.arange(B), torch.randint(0, L, (B,), generator=gen)] = True
    return m.to(device)


def exact_emd(cost, a, b):
    """The exact EMD of one problem by linear programming (scipy's HiGHS): the ground truth for Sinkhorn."""
    from scipy.optimize import linprog

    M, N = cost.shape
    A_eq = []
    for i in range(M):
        row = torch.zeros(M, N)
        row[i] = 1
        A_eq.append(row.flatten())
    for j in range(N):
        col = torch.zeros(M, N)
        col[:, j] = 1
        A_eq.append(col.flatten())
    res = linprog(cost.flatten().double().numpy(), A_eq=torch.stack(A_eq).double().numpy(),
                  b_eq=torch.cat([a, b]).double().numpy(), bounds=(0, None), method="highs")
    assert res.success
    return res.fun



# ---------------------------------------------------------------- a tiny labelled task and teacher

WORDS = ["good", "great", "fine", "nice", "bad", "awful", "poor", "sad", "the", "a", "movie", "film", "was",
         "is", "very", "plot", "acting", "really", "not", "so"]
POSITIVE, NEGATIVE = WORDS[:4], WORDS[4:8]


# Every encoder family fastkd supports, as a tiny config (vocab 32 fits write_tokenizer's words); `**over`
# changes sizes through the family's own attribute names.
FAMILY_TYPES = ("bert", "roberta", "xlm-roberta", "camembert", "electra", "ernie", "data2vec-text", "mobilebert",
                "megatron-bert", "distilbert", "albert", "deberta", "deberta-v2", "mpnet", "roformer", "modernbert")


# DeBERTa-v2/v3's attention variants, as config overrides of tiny_family_config("deberta-v2"): every DeBERTa-v3
# checkpoint ships "v3" (shared keys: query_proj and key_proj also project the relative embeddings, and there are
# no pos_* projections); "config-defaults" is DebertaV2Config()'s own (no relative attention); then every
# combination of shared/separate position keys, the position terms (both, c2p, p2c, none) and log buckets (0:
# none; 8: distances past 4 are bucketed, which the tests' 13-token batches reach).
DEBERTA_V2_VARIANTS = {
    "v3": dict(share_att_key=True, relative_attention=True, pos_att_type=["p2c", "c2p"], position_buckets=32,
               position_biased_input=False, norm_rel_ebd="layer_norm"),
    "config-defaults": dict(relative_attention=False, pos_att_type=None),
    **{f"{'shared' if shared else 'separate'}-{'+'.join(pos) or 'none'}-buckets{b}":
       dict(relative_attention=True, share_att_key=shared, pos_att_type=pos, position_buckets=b)
       for shared in (True, False) for pos in (["p2c", "c2p"], ["c2p"], ["p2c"], []) for b in (0, 8)},
}


def tiny_family_config(model_type: str, *, layers: int = 3, hidden: int = 32, heads: int = 4, ffn: int = 64,
                       attn: str | None = None, **over):
    """A tiny random config of ``model_type`` (no dropout), ``attn`` its attention implementation (None: the
    family's own, as fastkd loads it)."""
    from transformers import AutoConfig

    from fastkd.models.families import attention_interface

    kw = dict(vocab_size=32, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
              intermediate_size=ffn, max_position_embeddings=64, hidden_dropout_prob=0.0,
              attention_probs_dropout_prob=0.0, pad_token_id=0)
    if model_type == "distilbert":
        kw = dict(vocab_size=32, dim=hidden, n_layers=layers, n_heads=heads, hidden_dim=ffn,
                  max_position_embeddings=64, dropout=0.0, attention_dropout=0.0, pad_token_id=0)
    elif model_type == "mobilebert":
        kw.update(embedding_size=16, intra_bottleneck_size=hidden, true_hidden_size=hidden)
    elif model_type == "modernbert":
        kw.update(global_attn_every_n_layers=2, local_attention=16, bos_token_id=2, eos_token_id=3,
                  cls_token_id=2, sep_token_id=3, attention_dropout=0.0, mlp_dropout=0.0, embedding_dropout=0.0)
    elif model_type == "albert":
        kw.update(embedding_size=16)
    elif model_type in ("deberta", "deberta-v2"):
        kw.update(relative_attention=True, pos_att_type=["p2c", "c2p"], max_relative_positions=16)
    elif model_type in ("roberta", "xlm-roberta", "camembert", "data2vec-text"):
        kw.update(max_position_embeddings=66)  # positions start after the padding index
    kw.update(over)
    cfg = AutoConfig.for_model(model_type, **kw)
    cfg._attn_implementation = attn or attention_interface(cfg)
    return cfg


def tiny_family_model(model_type: str, *, seed: int = 0, num_labels: int = 2, peaked: bool = True, **cfg):
    """A tiny random sequence classifier of ``model_type``; ``peaked`` redraws the Q/K projection weights with
    std 0.3 (scores of std ~3) so the attention is far from uniform (a parity test on near-uniform attention
    would prove little)."""
    from transformers import AutoModelForSequenceClassification

    config = tiny_family_config(model_type, **cfg)
    config.num_labels = num_labels
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_config(config).eval()
    if peaked:
        # ELECTRA, MobileBERT and ALBERT feed attention through a projection without LayerNorm (embedding
        # projection, bottleneck), whose small init would flatten the scores again: those get every Linear redrawn.
        every_linear = model_type in ("electra", "mobilebert", "albert")
        with torch.no_grad():
            for name, mod in model.named_modules():
                qk = any(k in name for k in ("query", "key", "q_lin", "k_lin", ".q", ".k", "Wqkv", "in_proj"))
                if isinstance(mod, torch.nn.Linear) and (qk or every_linear) and "classifier" not in name:
                    mod.weight.normal_(0.0, 0.3)
                if isinstance(mod, torch.nn.Embedding) and every_linear:
                    mod.weight.normal_(0.0, 1.0)
    return model


def make_family_teacher(folder: Path, model_type: str, **cfg) -> Path:
    """A tiny random ``model_type`` classifier saved with ``save_pretrained`` and write_tokenizer's tokenizer."""
    tiny_family_model(model_type, peaked=False, **cfg).save_pretrained(folder)
    write_tokenizer(folder)
    return folder


def write_tokenizer(folder: Path):
    from transformers import BertTokenizerFast

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    # transformers 5 takes the vocabulary as `vocab` and quietly ignores `vocab_file` (a 5-token tokenizer that made
    # every word [UNK]: fastkd now refuses such a teacher); 4.x takes `vocab_file`.
    import inspect

    key = "vocab" if "vocab" in inspect.signature(BertTokenizerFast.__init__).parameters else "vocab_file"
    tok = BertTokenizerFast(**{key: str(folder / "vocab.txt")}, do_lower_case=True)
    assert len(tok) == len(vocab), (len(tok), len(vocab))
    tok.save_pretrained(folder)
    return tok


def make_sentences(n: int, seed: int) -> list[tuple[str, int]]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.randint(0, 1)
        filler = [rng.choice(WORDS[8:]) for _ in range(rng.randint(1, 12))]
        filler.insert(rng.randint(0, len(filler)), rng.choice(POSITIVE if label else NEGATIVE))
        rows.append((" ".join(filler), label))
    return rows


def write_task(folder: Path, n_train=48, n_dev=16, n_test=16) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for split, n, seed in (("train", n_train, 1), ("dev", n_dev, 2), ("test", n_test, 3)):
        lines = ["sentence\tlabel"] + [f"{t}\t{y}" for t, y in make_sentences(n, seed)]
        (folder / f"{split}.tsv").write_text("\n".join(lines) + "\n")
    return folder


def make_teacher(folder: Path, *, head: bool = True, num_labels: int = 2, **cfg_overrides) -> Path:
    from transformers import BertForSequenceClassification, BertModel

    torch.manual_seed(0)
    # The vocabulary padded up from the tokenizer's 25 tokens, as real models pad theirs (fastkd refuses a
    # tokenizer much smaller than the model's vocabulary: the sign of missing tokenizer files).
    cfg = tiny_bert_config(**{"vocab_size": 32, **cfg_overrides})
    cfg.num_labels = num_labels
    model = BertForSequenceClassification(cfg) if head else BertModel(cfg)
    model.save_pretrained(folder)
    write_tokenizer(folder)
    return folder


# ---------------------------------------------------------------- independent float64 losses


def valid_idx(mask, b: int, L: int) -> torch.Tensor:
    """Row b's valid token positions (all of them without a mask)."""
    return torch.arange(L) if mask is None else mask[b].cpu().nonzero().flatten()


def _scores64(q, k, b, h, i):
    return q[b, h, i].double() @ k[b, h, i].double().T / math.sqrt(q.shape[-1])


def attention_mse_f64(q_s, k_s, q_t, k_t, mask):
    """TinyBERT's attention-score MSE, mean over heads and valid (query, key) pairs, in float64, by loops."""
    B, H, L, _ = q_s.shape
    total, count = 0.0, 0
    for b in range(B):
        i = valid_idx(mask, b, L)
        for h in range(H):
            total = total + ((_scores64(q_s, k_s, b, h, i) - _scores64(q_t, k_t, b, h, i)) ** 2).sum()
            count += len(i) ** 2
    return total / count


def attention_kl_f64(q_s, k_s, q_t, k_t, mask):
    """MiniLM's KL(softmax S_t ‖ softmax S_s), mean over heads and valid query rows, valid keys only, float64."""
    B, H, L, _ = q_s.shape
    total, count = 0.0, 0
    for b in range(B):
        i = valid_idx(mask, b, L)
        for h in range(H):
            logp_t = torch.log_softmax(_scores64(q_t, k_t, b, h, i), -1)
            logp_s = torch.log_softmax(_scores64(q_s, k_s, b, h, i), -1)
            total = total + (logp_t.exp() * (logp_t - logp_s)).sum()
            count += len(i)
    return total / count


def hidden_mse_f64(h_s, h_t, weight, bias, mask):
    """TinyBERT's hidden MSE: mean over layer pairs of Σ_valid Σ_e (W·h + b − h_t)² / (n_valid·d_t), token by
    token, in float64."""
    if h_s.dim() == 3:
        h_s, h_t = h_s[None], h_t[None]
        weight = None if weight is None else weight[None]
        bias = None if bias is None else bias[None]
    K, B, L, _ = h_s.shape
    per_pair = []
    for k in range(K):
        total, count = 0.0, 0
        for b in range(B):
            i = torch.arange(L) if mask is None else mask[b].cpu().nonzero().flatten()
            x = h_s[k, b, i].double()
            if weight is not None:
                x = x @ weight[k].double().T
            if bias is not None:
                x = x + bias[k].double()
            total = total + ((x - h_t[k, b, i].double()) ** 2).sum()
            count += len(i) * h_t.shape[-1]
        per_pair.append(total / count)
    return sum(per_pair) / K
