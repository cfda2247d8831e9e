"""Where replacement words come from: a masked LM's predictions in context (single-piece words) and nearest
neighbours in a word-embedding space (multi-piece words; every word when no masked LM is named).

TinyBERT uses BERT-base's masked LM and GloVe (glove.6B.300d). Either can be named here (a fill-mask model folder
or hub name; a GloVe-format text file). Without them, the neighbours come from an embedding matrix fastkd already
has: the named masked LM's input embeddings, else the teacher's.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from fastkd.augment.words import Span, piece_ids


def load_masked_lm(name: str, device: torch.device):
    """A fill-mask model and its tokenizer, checked before any use: it has a trained masked-LM head, its tokenizer
    has a mask token and belongs to it. Refused with a ValueError naming ``mlm`` otherwise."""
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
        model, info = AutoModelForMaskedLM.from_pretrained(name, output_loading_info=True)
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"mlm: cannot load a fill-mask model from {name!r} ({str(e).splitlines()[0]}); name a "
                         f"local masked-LM folder, or a hub name already in the local cache") from e
    # A checkpoint without an MLM head (a plain encoder, a sentence-embedding model) loads with a random head
    # and predicts noise: refused. The decoder may be tied to the input embeddings (not saved, not missing).
    missing = [k for k in info.get("missing_keys", []) if "embeddings" not in k]
    if missing:
        raise ValueError(f"mlm: {name} has no trained fill-mask head (missing {', '.join(sorted(missing)[:3])}"
                         f"{'...' if len(missing) > 3 else ''}); name a masked-LM checkpoint such as "
                         f"bert-base-uncased")
    if tokenizer.mask_token_id is None:
        raise ValueError(f"mlm: {name}'s tokenizer has no mask token, so it cannot fill masks")
    out = model.get_output_embeddings()
    if out is None:
        raise ValueError(f"mlm: {name} ({type(model).__name__}) has no output layer over the vocabulary")
    if len(tokenizer) > out.weight.shape[0]:
        raise ValueError(f"mlm: {name}'s tokenizer has {len(tokenizer)} tokens but the model predicts "
                         f"{out.weight.shape[0]}: the tokenizer does not belong to this model")
    return model.to(device).eval(), tokenizer


@torch.inference_mode()
def mlm_candidates(model, tokenizer, queries: Sequence[tuple[str, Span]], m: int, whole: dict[int, str],
                   batch_size: int, device: torch.device) -> list[list[str]]:
    """For each (text, word span): the masked LM's top-``m`` predictions for the word in its context that are
    whole words (TinyBERT drops ``##`` pieces from its top-M). As TinyBERT's code does, the model reads the
    sentence and its masked copy as a pair, so the masked word's context includes the word itself."""
    out: list[list[str]] = [[] for _ in queries]
    masked = [t[:s] + tokenizer.mask_token + t[e:] for t, (s, e) in queries]
    order = sorted(range(len(queries)), key=lambda i: len(queries[i][0]))
    limit = min(512, getattr(model.config, "max_position_embeddings", 512))
    head = model.get_output_embeddings()
    where: dict[str, torch.Tensor] = {}
    # Only the mask positions go through the vocabulary projection (B x L x V logits would be most of the cost).
    hook = head.register_forward_pre_hook(lambda mod, args: (args[0][where["rows"], where["cols"]],))
    try:
        for b in range(0, len(order), batch_size):
            idx = order[b:b + batch_size]
            enc = tokenizer([queries[i][0] for i in idx], [masked[i] for i in idx], truncation="only_first",
                            max_length=limit, padding=True, return_tensors="pt").to(device)
            rows, cols = (enc["input_ids"] == tokenizer.mask_token_id).nonzero(as_tuple=True)
            if rows.numel() == 0:
                continue
            where["rows"], where["cols"] = rows, cols
            logits = model(**enc).logits.float()
            top = logits.topk(min(m, logits.shape[-1]), dim=-1).indices.tolist()
            for r, ids in zip(rows.tolist(), top, strict=True):
                out[idx[r]] = [whole[i] for i in ids if i in whole]
    finally:
        hook.remove()
    return out


class Neighbours:
    """Nearest neighbours by cosine similarity among whole words: of a vocabulary's embedding rows (a word's vector:
    its single row, or the mean of its pieces' rows) or of a GloVe table's words."""

    def __init__(self, words: list[str], vectors: torch.Tensor, lookup, source: str):
        self.words, self.source = words, source
        self.unit = torch.nn.functional.normalize(vectors.float(), dim=1)
        self.lookup = lookup  # word -> vector, or None where the space has no vector for it
        self.memo: dict[str, list[str]] = {}

    @classmethod
    def from_embeddings(cls, matrix: torch.Tensor, tokenizer, whole: dict[int, str], source: str) -> Neighbours:
        matrix = matrix.detach().float().cpu()
        ids = sorted(whole)

        def lookup(word: str):
            pieces = piece_ids(tokenizer, [word])[0]
            return matrix[pieces].mean(0) if pieces else None

        return cls([whole[i] for i in ids], matrix[ids], lookup, source)

    @classmethod
    def from_glove(cls, path: str | Path) -> Neighbours:
        """A GloVe-format text file (a word, then its vector, per line); only alphabetic words are candidates."""
        p = Path(path)
        if not p.is_file():
            raise ValueError(f"embeddings: {p} is not a file (expected a GloVe-format text file: a word and its "
                             f"vector per line)")
        words, rows, width = [], [], None
        with open(p, encoding="utf-8", errors="replace") as fh:
            for n, line in enumerate(fh, 1):
                parts = line.rstrip("\n").split(" ")
                if len(parts) < 2 or not parts[0]:
                    continue
                try:
                    vec = [float(x) for x in parts[1:]]
                except ValueError as e:
                    raise ValueError(f"embeddings: {p} line {n} is not 'word v1 v2 ...' ({e})") from e
                width = width or len(vec)
                if len(vec) != width:
                    raise ValueError(f"embeddings: {p} line {n} has {len(vec)} values, earlier lines {width}")
                if parts[0].isalpha():
                    words.append(parts[0])
                    rows.append(vec)
        if not words:
            raise ValueError(f"embeddings: {p} holds no alphabetic word with a vector")
        vectors = torch.tensor(rows, dtype=torch.float32)
        index = {w: i for i, w in enumerate(words)}

        def lookup(word: str):
            i = index.get(word, index.get(word.lower()))
            return None if i is None else vectors[i]

        return cls(words, vectors, lookup, str(p))

    def nearest(self, words: Sequence[str], m: int, device: torch.device, batch: int = 1024) -> list[list[str]]:
        """Each word's ``m`` nearest whole words (itself excluded, case-insensitively); [] where the space has no
        vector for it. Memoised: a word's neighbours do not depend on its sentence."""
        todo = [w for w in dict.fromkeys(words) if w not in self.memo]
        vecs = [(w, self.lookup(w)) for w in todo]
        for w, v in vecs:
            if v is None:
                self.memo[w] = []
        known = [(w, v) for w, v in vecs if v is not None]
        unit = self.unit.to(device)
        for b in range(0, len(known), batch):
            part = known[b:b + batch]
            q = torch.nn.functional.normalize(torch.stack([v for _, v in part]).float().to(device), dim=1)
            top = (q @ unit.T).topk(min(m + 1, unit.shape[0]), dim=1).indices.tolist()
            for (w, _), ids in zip(part, top, strict=True):
                self.memo[w] = [self.words[i] for i in ids if self.words[i].lower() != w.lower()][:m]
        return [self.memo[w] for w in words]
