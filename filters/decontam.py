"""Benchmark decontamination: an n-gram index over test sets, confirmed by a match ratio.

Sources: GPT-3 (Brown et al. 2020) and lm-eval-harness's janitor flag training text sharing a
13-gram of normalised words with a benchmark item; Phi-1 and Cosmopedia (Ben Allal et al. 2024)
then confirm each candidate with difflib and drop the document when the matched words cover more
than half of the benchmark item. Both steps here:

1. Index: every benchmark item (one text field of one row) is normalised (lower case, words
   `\\w+`, punctuation and spacing dropped) and its 13-grams hashed (64 bits). Items under 8
   words are not distinctive and are skipped; items of 8-12 words are indexed by their 8-grams.
2. Candidates: a document's n-grams are hashed the same way (only windows whose words all occur
   in some benchmark, a cheap pre-check) and looked up in a sorted array.
3. Confirmation: difflib.SequenceMatcher between the item's words and the document's words
   around the hit; matched words / item words > 0.5 -> `contaminated:<benchmark>`.

The rejection's detail records the benchmark, row, field, the ratio, and the longest matched
span of the document (its text and character offsets).

`normalise` and `NgramIndex` (steps 1 and 2) are shared: the faithfulness rule finds the runs a
grounded document copies from its passage with them (filters/faithfulness.py).
"""

from __future__ import annotations

import difflib
import itertools
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from booksmith.filters.benchmarks import BenchmarkItem, load_benchmark
from booksmith.filters.scored import ScoredOutput
from booksmith.filters.text import ngram_hashes
from booksmith.schemas import Document
from booksmith.schemas.filter_settings import DecontamSettings

_WORD = re.compile(r"\w+")
MAX_CANDIDATES = 64  # items confirmed per document at most (a bound for pathological input)


def normalise(text: str) -> list[str]:
    """Lower-cased words, punctuation and spacing dropped: what both n-gram users compare."""
    return _WORD.findall(text.lower())


class NgramIndex:
    """Word n-grams of some texts, hashed (64 bits) over one vocabulary and looked up in sorted
    arrays. `add` indexes a text's n-grams under a key (any n; each n has its own table);
    `hits` hashes only the windows of a text whose words all occur in an indexed text (a cheap
    pre-check) and returns those the index holds."""

    def __init__(self) -> None:
        self.vocab: dict[str, int] = {}
        self._tables: dict[int, dict[int, list[int]]] = {}  # n -> hash -> keys
        self._sorted: dict[int, np.ndarray] = {}  # n -> its hashes, sorted (built on lookup)

    def add(self, words: list[str], n: int, key: int) -> None:
        ids = np.fromiter(
            (self.vocab.setdefault(w, len(self.vocab)) for w in words), dtype=np.uint64
        )
        table = self._tables.setdefault(n, {})
        for h in set(ngram_hashes(ids, n).tolist()):
            table.setdefault(h, []).append(key)
        self._sorted.pop(n, None)

    def keys(self, n: int, h: int) -> list[int]:
        """The keys of the texts whose n-grams include hash `h`."""
        return self._tables[n][h]

    def hits(self, words: list[str]) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        """Per n indexed (ascending): the positions of the n-word windows of `words` that the
        index holds, ascending, and their hashes."""
        unknown = len(self.vocab)
        ids = np.fromiter((self.vocab.get(w, unknown) for w in words), dtype=np.uint64)
        oov = np.concatenate(([0], np.cumsum(ids == unknown)))
        for n in sorted(self._tables):
            if len(words) < n:
                continue
            positions = np.nonzero(oov[n:] == oov[:-n])[0]  # windows with no unknown word
            if not len(positions):
                continue
            if n not in self._sorted:
                self._sorted[n] = np.array(sorted(self._tables[n]), dtype=np.uint64)
            sorted_hashes = self._sorted[n]
            hashes = ngram_hashes(ids, n)[positions]
            at = np.searchsorted(sorted_hashes, hashes).clip(max=len(sorted_hashes) - 1)
            hit = sorted_hashes[at] == hashes
            yield n, positions[hit], hashes[hit]


@dataclass(frozen=True)
class Contamination:
    item: BenchmarkItem
    ratio: float
    span: str  # the longest matched run of words, as it appears in the document
    start: int  # character offsets of that span in the document
    end: int
    ngram: int

    def detail(self) -> dict[str, Any]:
        return {
            "benchmark": self.item.benchmark,
            "row": self.item.row,
            "field": self.item.field,
            "ratio": round(self.ratio, 4),
            "span": self.span,
            "start": self.start,
            "end": self.end,
            "ngram": self.ngram,
        }


class BenchmarkIndex:
    def __init__(
        self,
        items: Sequence[BenchmarkItem],
        *,
        n: int = 13,
        min_item_words: int = 8,
        match_ratio: float = 0.5,
    ) -> None:
        self.n, self.min_item_words, self.match_ratio = n, min_item_words, match_ratio
        self.ngrams = NgramIndex()  # item index -> its n-grams (8-grams for short items)
        self.items: list[BenchmarkItem] = []
        self.words: list[list[str]] = []
        self.skipped = 0
        for item in items:
            words = normalise(item.text)
            if len(words) < min_item_words:
                self.skipped += 1
                continue
            g = n if len(words) >= n else min_item_words
            self.ngrams.add(words, g, len(self.items))
            self.items.append(item)
            self.words.append(words)
        self.benchmarks = sorted({i.benchmark for i in self.items})

    def __len__(self) -> int:
        return len(self.items)

    def _candidates(self, words: list[str]) -> list[tuple[int, int, int]]:
        """(item, word position of the first hit, gram length), in document order."""
        found: dict[int, tuple[int, int]] = {}
        for g, positions, hashes in self.ngrams.hits(words):
            for pos, h in zip(positions.tolist(), hashes.tolist(), strict=True):
                for item in self.ngrams.keys(g, h):
                    if item not in found or pos < found[item][0]:
                        found[item] = (pos, g)
        return sorted(((item, p, g) for item, (p, g) in found.items()), key=lambda c: c[1])

    def find(self, text: str) -> Contamination | None:
        """The first benchmark item the text contains (confirmed), or None."""
        if not self.items:
            return None
        words = normalise(text)
        for item, pos, g in self._candidates(words)[:MAX_CANDIDATES]:
            item_words = self.words[item]
            lo = max(0, pos - len(item_words))
            hi = min(len(words), pos + g + len(item_words))
            sm = difflib.SequenceMatcher(None, words[lo:hi], item_words, autojunk=False)
            blocks = sm.get_matching_blocks()
            ratio = sum(b.size for b in blocks) / len(item_words)
            if ratio > self.match_ratio:
                longest = max(blocks, key=lambda b: b.size)
                first, last = lo + longest.a, lo + longest.a + longest.size - 1
                start, end = _char_span(text, first, last)
                return Contamination(
                    item=self.items[item],
                    ratio=ratio,
                    span=text[start:end],
                    start=start,
                    end=end,
                    ngram=g,
                )
        return None


def _char_span(text: str, first: int, last: int) -> tuple[int, int]:
    """Character offsets from the start of word `first` to the end of word `last`."""
    lowered = text.lower()
    if len(lowered) == len(text):  # almost always: offsets in the lowered text are the same
        matches = itertools.islice(_WORD.finditer(lowered), first, last + 1)
        spans = [m.span() for m in matches]
    else:  # lower() changed lengths (e.g. "İ"): walk the words of the original
        spans, seen = [], 0
        for m in _WORD.finditer(text):
            count = len(_WORD.findall(m.group().lower()))
            if seen + count > first and seen <= last:
                spans.append(m.span())
            seen += count
            if seen > last:
                break
    return (spans[0][0], spans[-1][1]) if spans else (0, 0)


def build_index(settings: DecontamSettings) -> BenchmarkIndex:
    items: list[BenchmarkItem] = []
    for spec in settings.benchmarks:
        items.extend(load_benchmark(spec, settings.fields))
    return BenchmarkIndex(
        items,
        n=settings.ngram,
        min_item_words=settings.min_item_words,
        match_ratio=settings.match_ratio,
    )


class DecontamFilter:
    name = "decontam"

    def __init__(self, index: BenchmarkIndex) -> None:
        self.index = index

    @classmethod
    def from_settings(cls, settings: DecontamSettings) -> DecontamFilter:
        return cls(build_index(settings))

    def run(self, docs: Sequence[Document]) -> ScoredOutput:
        out = ScoredOutput()
        for doc in docs:
            hit = self.index.find(doc.text)
            if hit is None:
                out.kept.append(doc)
            else:
                out.reject(doc, f"contaminated:{hit.item.benchmark}", detail=hit.detail())
        return out
