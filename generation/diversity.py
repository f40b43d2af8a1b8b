"""Diversity of a generated corpus: the numbers that tell whether prompts really varied.

- distinct_n (n = 1, 2, 3): distinct word n-grams / all word n-grams over the corpus (Li et al.
  2016); low values mean the model keeps saying the same things.
- top_opener_share: share of documents opening with the most common first five words (59% of
  TinyStories-style stories open "Once upon a time").
- compression_ratio: raw bytes / zlib-compressed bytes of the corpus (Shaib et al. 2024);
  higher means more redundant text.
- mean_pairwise_minhash: mean estimated Jaccard similarity of word 5-gram sets over all pairs
  of a sample of documents (datasketch MinHash, 128 permutations).
- axis_coverage: documents per audience, style and format, and the share of each axis's values
  that appear at all.
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
import random
import re
import zlib
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from datasketch import MinHash

_WORD = re.compile(r"\w+")
OPENER_WORDS = 5
MINHASH_SAMPLE = 200
SHINGLE = 5


def words(text: str) -> list[str]:
    return _WORD.findall(text.casefold())


def distinct_n(texts: Sequence[str], n: int) -> float:
    # The n-grams' 64-bit hashes in one array, not a set of tuples: a tenth of the memory for
    # a sample of thousands of documents; two distinct n-grams of one corpus share a hash with
    # negligible probability.
    parts: list[np.ndarray] = []
    for text in texts:
        w = words(text)
        if len(w) >= n:
            grams = (hash(tuple(w[i : i + n])) for i in range(len(w) - n + 1))
            parts.append(np.fromiter(grams, dtype=np.int64, count=len(w) - n + 1))
    if not parts:
        return 0.0
    hashes = np.concatenate(parts)
    return len(np.unique(hashes)) / len(hashes)


def openers(texts: Sequence[str], k: int = OPENER_WORDS) -> Counter[str]:
    return Counter(" ".join(words(t)[:k]) for t in texts if words(t))


def top_opener_share(texts: Sequence[str]) -> float:
    counts = openers(texts)
    return counts.most_common(1)[0][1] / sum(counts.values()) if counts else 0.0


def compression_ratio(texts: Sequence[str]) -> float:
    raw = "\n".join(texts).encode("utf-8")
    return len(raw) / len(zlib.compress(raw, 9)) if raw else 0.0


def _minhash(text: str) -> MinHash:
    w = words(text)
    shingles = {" ".join(w[i : i + SHINGLE]) for i in range(max(1, len(w) - SHINGLE + 1))}
    m = MinHash(num_perm=128, seed=1)
    m.update_batch([s.encode("utf-8") for s in shingles])
    return m


def mean_pairwise_minhash(
    texts: Sequence[str], sample: int = MINHASH_SAMPLE, seed: int = 0
) -> float:
    """Mean estimated Jaccard over all pairs of a seeded sample (0 with fewer than 2 texts)."""
    chosen = [t for t in texts if t.strip()]
    if len(chosen) > sample:
        chosen = random.Random(seed).sample(chosen, sample)
    if len(chosen) < 2:
        return 0.0
    sigs = [_minhash(t) for t in chosen]
    pairs = list(itertools.combinations(sigs, 2))
    return sum(a.jaccard(b) for a, b in pairs) / len(pairs)


def axis_coverage(
    rows: Sequence[Mapping[str, str]], axes: Mapping[str, Sequence[str]]
) -> dict[str, dict[str, Any]]:
    """For each axis (e.g. "audience" -> its configured values): counts and covered share."""
    out: dict[str, dict[str, Any]] = {}
    for axis, values in axes.items():
        counts = Counter(row[axis] for row in rows)
        out[axis] = {
            "counts": {v: counts.get(v, 0) for v in values},
            "covered": sum(1 for v in values if counts.get(v)) / len(values) if values else 0.0,
        }
    return out


def diversity_report(
    texts: Sequence[str],
    rows: Sequence[Mapping[str, str]] = (),
    axes: Mapping[str, Sequence[str]] | None = None,
) -> dict[str, Any]:
    """Every metric above, as the manifest's `diversity` section."""
    return {
        "documents": len(texts),
        "distinct_1": round(distinct_n(texts, 1), 4),
        "distinct_2": round(distinct_n(texts, 2), 4),
        "distinct_3": round(distinct_n(texts, 3), 4),
        "top_opener_share": round(top_opener_share(texts), 4),
        "top_openers": openers(texts).most_common(10),
        "compression_ratio": round(compression_ratio(texts), 4),
        "mean_pairwise_minhash": round(mean_pairwise_minhash(texts), 4),
        "minhash_sample": min(len(texts), MINHASH_SAMPLE),
        "axis_coverage": axis_coverage(rows, axes or {}),
    }


class DiversitySample:
    """Diversity of a stream of kept documents in bounded memory: axis coverage from exact
    counters over every document, the text metrics (distinct-n, openers, compression, pairwise
    MinHash) over a seeded sample of `k` documents: those whose id hashes lowest (a bottom-k
    sample, so the same documents are chosen whatever order or chunking they stream in)."""

    def __init__(self, axes: Mapping[str, Sequence[str]], k: int = 2_000) -> None:
        self.axes, self.k = axes, k
        self.documents = 0
        self.axis_counts: dict[str, Counter[str]] = {axis: Counter() for axis in axes}
        self._heap: list[tuple[int, str]] = []  # (-hash, text): the k lowest hashes

    def add(
        self, ids: Sequence[str], texts: Sequence[str], rows: Sequence[Mapping[str, str]]
    ) -> None:
        for doc_id, text, row in zip(ids, texts, rows, strict=True):
            self.documents += 1
            for axis, counts in self.axis_counts.items():
                counts[row[axis]] += 1
            h = int.from_bytes(hashlib.blake2b(doc_id.encode(), digest_size=8).digest(), "big")
            if len(self._heap) < self.k:
                heapq.heappush(self._heap, (-h, text))
            elif -h > self._heap[0][0]:
                heapq.heapreplace(self._heap, (-h, text))

    def report(self) -> dict[str, Any]:
        sample = [text for _, text in sorted(self._heap, reverse=True)]  # by hash, ascending
        out = diversity_report(sample)
        out["documents"] = self.documents
        out["sample"] = {"documents": len(sample), "method": f"bottom-{self.k} by id hash"}
        out["axis_coverage"] = {
            axis: {
                "counts": {v: counts.get(v, 0) for v in self.axes[axis]},
                "covered": sum(1 for v in self.axes[axis] if counts.get(v)) / len(self.axes[axis])
                if self.axes[axis]
                else 0.0,
            }
            for axis, counts in self.axis_counts.items()
        }
        return out
