"""A synthetic corpus with known near-duplicates, for dedup tests and benchmarks.

Base documents are drawn from a Zipf-like vocabulary with sentence punctuation and capitals (so
normalisation has work); each variant copies a base and substitutes or inserts words at a chosen
rate, which spreads the pairs' true Jaccard similarity over 0..1. `exact_jaccard` computes the
truth from the 5-gram sets of the normalised words.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from booksmith.filters.dedup.normalize import words


def _vocabulary(rng: np.random.Generator, size: int) -> list[str]:
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    lengths = rng.integers(2, 10, size=size)
    vocab = {"".join(rng.choice(letters, n)) for n in lengths}
    return sorted(vocab)


@dataclass
class Corpus:
    ids: list[str] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    pairs: list[tuple[int, int, float]] = field(default_factory=list)  # (base, variant, true J)


def _render(tokens: list[str]) -> str:
    out = []
    for i, t in enumerate(tokens):
        if i % 13 == 0:
            t = t.capitalize()
        out.append(t + ("." if i % 13 == 12 else ""))
    return " ".join(out)


def shingle_set(text: str, n: int = 5) -> set[tuple[bytes, ...]]:
    ws = words(text)
    if 0 < len(ws) < n:
        return {tuple(ws)}
    return {tuple(ws[i : i + n]) for i in range(len(ws) - n + 1)}


def exact_jaccard(a: str, b: str, n: int = 5) -> float:
    sa, sb = shingle_set(a, n), shingle_set(b, n)
    if not sa and not sb:
        return 1.0
    return len(sa & sb) / len(sa | sb)


def make_corpus(
    n_base: int,
    n_variants: int,
    words_per_doc: int = 600,
    seed: int = 0,
    max_rate: float = 0.25,
    vocab_size: int = 30_000,
) -> Corpus:
    """`n_base` distinct documents, then `n_variants` edited copies of random bases."""
    rng = np.random.default_rng(seed)
    vocab = _vocabulary(rng, vocab_size)
    ranks = np.arange(1, len(vocab) + 1)
    cdf = np.cumsum(1.0 / (ranks + 20.0))
    cdf /= cdf[-1]

    def draw(k: int) -> list[str]:
        picks = np.minimum(np.searchsorted(cdf, rng.random(k)), len(vocab) - 1)
        return [vocab[j] for j in picks.tolist()]

    corpus = Corpus()
    base_tokens: list[list[str]] = []
    for i in range(n_base):
        length = int(rng.integers(words_per_doc * 3 // 4, words_per_doc * 5 // 4 + 1))
        tokens = draw(length)
        base_tokens.append(tokens)
        corpus.ids.append(f"base-{i}")
        corpus.texts.append(_render(tokens))
    for k in range(n_variants):
        b = int(rng.integers(n_base))
        tokens = list(base_tokens[b])
        rate = max_rate * float(rng.random()) ** 2  # more pairs at high similarity
        positions = np.flatnonzero(rng.random(len(tokens)) < rate).tolist()
        for pos, new in zip(positions, draw(len(positions)), strict=True):
            if rng.random() < 0.8:
                tokens[pos] = new
            else:
                tokens.insert(pos, new)
        corpus.ids.append(f"variant-{k}")
        corpus.texts.append(_render(tokens))
        v = len(corpus.texts) - 1
        corpus.pairs.append((b, v, exact_jaccard(corpus.texts[b], corpus.texts[v])))
    return corpus
