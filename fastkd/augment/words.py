"""TinyBERT's augmentation rules at the word level: which words are replaced, with what, and how copies are drawn.

TinyBERT's data_augmentation.py splits a sentence into words with BERT's basic tokenizer (whitespace and
punctuation), skips stop words and anything that is not purely alphabetic, and gives every other word a candidate
list: a single-piece word (one WordPiece token) the masked LM's top-M predictions at its position, a multi-piece
word its M nearest neighbours in GloVe. Each copy then replaces each such word with probability p by a candidate
drawn uniformly; copies already seen (or equal to the original) are dropped, so an example yields at most N.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence

# TinyBERT's StopWordsList (NLTK's English stop words, as its data_augmentation.py lists them).
STOPWORDS = frozenset("""
i me my myself we our ours ourselves you your yours yourself yourselves he him his himself she her hers herself it
its itself they them their theirs themselves what which who whom this that these those am is are was were be been
being have has had having do does did doing a an the and but if or because as until while of at by for with about
against between into through during before after above below to from up down in out on off over under again further
then once here there when where why how all any both each few more most other some such no nor not only own same so
than too very s t can will just don should now d ll m o re ve y ain aren couldn didn doesn hadn hasn haven isn ma
mightn mustn needn shan shouldn wasn weren won wouldn
""".split())

# BERT's basic tokenizer's split: runs of word characters, and each punctuation character on its own.
_WORD = re.compile(r"\w+|[^\w\s]")

Span = tuple[int, int]


def word_spans(text: str) -> list[Span]:
    """(start, end) of each word of ``text``, split on whitespace and punctuation as BERT's basic tokenizer does."""
    return [m.span() for m in _WORD.finditer(text)]


def replaceable(word: str) -> bool:
    """TinyBERT replaces alphabetic words that are not stop words."""
    return word.isalpha() and word.lower() not in STOPWORDS


def whole_word_ids(tokenizer) -> dict[int, str]:
    """The vocabulary entries that are whole alphabetic words: a token whose text, tokenised alone, is that very
    token (so no ``##`` continuation, no sub-word piece, no special token). What a replacement may be."""
    special = set(tokenizer.all_special_ids)
    ids = [i for i in range(len(tokenizer)) if i not in special]
    texts = [tokenizer.convert_tokens_to_string([t]).strip() for t in tokenizer.convert_ids_to_tokens(ids)]
    keep = [(i, t) for i, t in zip(ids, texts, strict=True) if t.isalpha()]
    enc = tokenizer([t for _, t in keep], add_special_tokens=False)["input_ids"] if keep else []
    return {i: t for (i, t), got in zip(keep, enc, strict=True) if got == [i]}


def piece_ids(tokenizer, words: Sequence[str]) -> list[list[int]]:
    """Each word's token ids, alone and without special tokens (one id: a single-piece word)."""
    return tokenizer(list(words), add_special_tokens=False)["input_ids"] if words else []


def example_rng(seed: int, row: int, side: int = 0) -> random.Random:
    """One generator per (seed, example, side): an example's copies do not depend on which examples were augmented
    with it (chunks, a resumed run)."""
    return random.Random(f"fastkd-augment:{seed}:{row}:{side}")


def draw_copies(texts: Sequence[str], spans: Sequence[list[Span]], candidates: Sequence[dict[int, list[str]]],
                copies: int, p: float, rng: random.Random) -> list[tuple[str, ...]]:
    """Up to ``copies`` new versions of one example (its ``texts``: one, or the two sides of a pair, each with its
    word ``spans`` and per-word ``candidates``). Each attempt replaces each candidate word with probability ``p``
    (a uniform choice among its candidates); an attempt equal to the original or to an earlier copy is dropped, as
    TinyBERT drops it, so fewer than ``copies`` may come back."""
    seen = {tuple(texts)}
    out = []
    for _ in range(copies):
        new = []
        for text, sp, cand in zip(texts, spans, candidates, strict=True):
            parts, last = [], 0
            for w, (s, e) in enumerate(sp):
                if w not in cand:
                    continue
                choice = rng.choice(cand[w])
                if rng.random() < p:
                    parts += [text[last:s], choice]
                    last = e
            new.append("".join(parts) + text[last:])
        key = tuple(new)
        if key not in seen:
            seen.add(key)
            out.append(key)
    return out
