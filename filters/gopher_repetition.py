"""Gopher repetition rules: duplicate lines and paragraphs, top n-grams, duplicated n-grams.

Source: Rae et al. 2021 (Gopher), appendix A and table A1; the same thresholds as datatrove's
GopherRepetitionFilter. Small generated models loop ("The sun is a star. The sun is a star.")
and these rules are what catch it.

Rules (reason, default maximum):
- `repetition:dup_line_frac`        lines that repeat an earlier line / lines          0.30
- `repetition:dup_para_frac`        the same for paragraphs (split on blank lines)     0.30
- `repetition:dup_line_char_frac`   characters in repeated lines / len(text)           0.20
- `repetition:dup_para_char_frac`   the same for paragraphs                            0.20
- `repetition:top_<n>_gram`         characters of the most frequent n-gram, times its
                                    count / characters in words; n=2,3,4: 0.20, 0.18, 0.16
- `repetition:dup_<n>_gram`         characters of words inside a repeat of an earlier
                                    n-gram (each word counted once) / characters in
                                    words; n=5..10: 0.15, 0.14, 0.13, 0.12, 0.11, 0.10

Words are whitespace tokens; for the n-gram rules "characters" are those of the words
(whitespace excluded), so a document's layout does not move the fractions. N-grams are
compared through 64-bit hashes of word ids, computed with NumPy for the whole document at once.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from booksmith.filters.scored import RuleFilter, Verdict
from booksmith.filters.text import ngram_hashes, word_ids
from booksmith.schemas import Document
from booksmith.schemas.filter_settings import GopherRepetitionSettings

_PARAGRAPHS = re.compile(r"\n\s*\n")


def _duplicates(parts: list[str]) -> tuple[int, int]:
    """(how many parts repeat an earlier one, their characters)."""
    seen: set[str] = set()
    count = chars = 0
    for part in parts:
        if part in seen:
            count += 1
            chars += len(part)
        else:
            seen.add(part)
    return count, chars


def _top_ngram_chars(hashes: np.ndarray, lengths: np.ndarray, n: int) -> int:
    """Characters of the most frequent n-gram times its count (0 when no n-gram repeats)."""
    _, first, counts = np.unique(hashes, return_index=True, return_counts=True)
    best = int(np.argmax(counts))
    if counts[best] < 2:
        return 0
    start = int(first[best])
    return int(lengths[start : start + n].sum()) * int(counts[best])


def _dup_ngram_chars(hashes: np.ndarray, lengths: np.ndarray, n: int) -> int:
    """Characters of the words covered by an n-gram that occurred earlier in the document."""
    _, first, inverse = np.unique(hashes, return_index=True, return_inverse=True)
    repeat_starts = np.nonzero(first[inverse] != np.arange(len(hashes)))[0]
    if not len(repeat_starts):
        return 0
    size = len(lengths) + 1
    cover = np.bincount(repeat_starts, minlength=size) - np.bincount(
        repeat_starts + n, minlength=size
    )
    covered = np.cumsum(cover[:-1]) > 0
    return int(lengths[covered].sum())


def check(text: str, s: GopherRepetitionSettings) -> tuple[str, dict[str, Any]] | None:
    """The first rule `text` breaks, with its measured value and threshold; None if none."""
    lines = [line.strip() for line in text.splitlines()]
    lines = [line for line in lines if line]
    paragraphs = [p.strip() for p in _PARAGRAPHS.split(text.strip()) if p.strip()]
    total_chars = len(text) or 1
    for unit, parts, max_frac, max_chars in (
        ("para", paragraphs, s.max_dup_para_frac, s.max_dup_para_char_frac),
        ("line", lines, s.max_dup_line_frac, s.max_dup_line_char_frac),
    ):
        if not parts:
            continue
        count, chars = _duplicates(parts)
        if count / len(parts) > max_frac:
            return f"repetition:dup_{unit}_frac", {
                "value": round(count / len(parts), 4),
                "max": max_frac,
            }
        if chars / total_chars > max_chars:
            return f"repetition:dup_{unit}_char_frac", {
                "value": round(chars / total_chars, 4),
                "max": max_chars,
            }
    words = text.split()
    if not words:
        return None
    ids = word_ids(words)
    lengths = np.fromiter(map(len, words), dtype=np.int64, count=len(words))
    word_chars = int(lengths.sum())
    for n, max_frac in sorted(s.top_ngram_max_frac.items()):
        hashes = ngram_hashes(ids, n)
        if not len(hashes):
            continue
        frac = _top_ngram_chars(hashes, lengths, n) / word_chars
        if frac > max_frac:
            return f"repetition:top_{n}_gram", {"value": round(frac, 4), "max": max_frac}
    for n, max_frac in sorted(s.dup_ngram_max_frac.items()):
        hashes = ngram_hashes(ids, n)
        if not len(hashes):
            continue
        frac = _dup_ngram_chars(hashes, lengths, n) / word_chars
        if frac > max_frac:
            return f"repetition:dup_{n}_gram", {"value": round(frac, 4), "max": max_frac}
    return None


class GopherRepetitionFilter(RuleFilter):
    name = "gopher_repetition"

    def __init__(self, settings: GopherRepetitionSettings | None = None) -> None:
        self.settings = settings or GopherRepetitionSettings()

    def check(self, doc: Document) -> Verdict:
        return check(doc.text, self.settings)
