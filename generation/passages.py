"""A source record cut into passages on paragraph boundaries, each within a token window.

Paragraphs (split at blank lines) are joined greedily while the passage stays within
`max_tokens`; a paragraph longer than that is cut at its lines, and a line longer still at its
words. A record's last passage under `min_tokens` joins the one before when both fit, else it
is dropped (too little to ground a text in). Each passage keeps its character span in the
record's text, which provenance records.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

_PARAGRAPH = re.compile(r"\n[ \t]*\n\s*")  # a blank line (and what follows it) ends one
_LINE = re.compile(r"\n")

Counter = Callable[[str], int]  # tokens of a text under the run's encoding
SLACK = 8  # tokens of room a join taken by its bound leaves below the window


@dataclass(frozen=True)
class Passage:
    index: int  # within its record
    start: int  # character span in the record's text
    end: int
    text: str
    n_tokens: int


def cut_passages(text: str, count: Counter, min_tokens: int, max_tokens: int) -> list[Passage]:
    """The passages of `text` (see the module docstring); none for a record under the window."""
    paragraphs = _split(text, 0, len(text), _PARAGRAPH)
    units = [u for p in paragraphs for u in _fit(text, p, count, max_tokens)]
    guessed: set[int] = set()
    spans = _exact(text, _pack(text, units, count, max_tokens, guessed), guessed, count)
    if any(n > max_tokens for _, _, n in spans):  # a bound that did not hold: count every join
        spans = _pack(text, units, count, max_tokens)
    if len(spans) > 1 and spans[-1][2] < min_tokens:
        n = count(text[spans[-2][0] : spans[-1][1]])
        if n <= max_tokens:
            last = spans.pop()
            spans[-1] = (spans[-1][0], last[1], n)
    out: list[Passage] = []
    for start, end, n in spans:
        if n >= min_tokens:
            out.append(Passage(len(out), start, end, text[start:end], n))
    return out


def _split(text: str, start: int, end: int, sep: re.Pattern[str]) -> list[tuple[int, int]]:
    """Spans of the non-blank pieces of text[start:end] between matches of `sep`, trailing
    whitespace trimmed."""
    spans, at = [], start
    for m in sep.finditer(text, start, end):
        spans.append((at, m.start()))
        at = m.end()
    spans.append((at, end))
    trimmed = []
    for s, e in spans:
        piece = text[s:e]
        lead = len(piece) - len(piece.lstrip())
        body = piece.strip()
        if body:
            trimmed.append((s + lead, s + lead + len(body)))
    return trimmed


def _fit(
    text: str, span: tuple[int, int], count: Counter, max_tokens: int
) -> list[tuple[int, int, int]]:
    """(start, end, tokens) pieces of one paragraph, each within max_tokens: the paragraph
    whole, else its lines, else runs of words."""
    start, end = span
    n = count(text[start:end])
    if n <= max_tokens:
        return [(start, end, n)]
    lines = _split(text, start, end, _LINE)
    if len(lines) > 1:
        pieces = [p for line in lines for p in _fit(text, line, count, max_tokens)]
        return _pack(text, pieces, count, max_tokens)
    words = [(start + m.start(), start + m.end()) for m in re.finditer(r"\S+", text[start:end])]
    # (a single word over the window is kept whole: there is no boundary to cut it at)
    return _pack(text, [(s, e, count(text[s:e])) for s, e in words], count, max_tokens)


def _pack(
    text: str,
    pieces: list[tuple[int, int, int]],
    count: Counter,
    max_tokens: int,
    guessed: set[int] | None = None,
) -> list[tuple[int, int, int]]:
    """Consecutive pieces joined while the joined text (whitespace between them included)
    stays within max_tokens, counted exactly. With `guessed` (bounded): a join whose bound
    (the two counts, a token per character of the whitespace between, one more for the seam)
    fits with room to spare is taken without counting, and the index of its result goes into
    `guessed`; counting the growing passage at every join was most of the time a source took
    to plan. The caller counts those exactly."""
    out: list[tuple[int, int, int]] = []
    for s, e, n in pieces:
        if out and out[-1][2] + n <= max_tokens:
            start, end, had = out[-1]
            bound = had + n + (s - end) + 1
            if guessed is not None and bound + SLACK <= max_tokens:
                out[-1] = (start, e, bound)
                guessed.add(len(out) - 1)
                continue
            joined = count(text[start:e])
            if joined <= max_tokens:
                out[-1] = (start, e, joined)
                if guessed is not None:
                    guessed.discard(len(out) - 1)
                continue
        out.append((s, e, n))
    return out


def _exact(
    text: str, spans: list[tuple[int, int, int]], guessed: set[int], count: Counter
) -> list[tuple[int, int, int]]:
    """The spans with exact counts: only those a bound joined are counted again (a single
    piece or an exact join already has its own count)."""
    return [(s, e, count(text[s:e]) if i in guessed else n) for i, (s, e, n) in enumerate(spans)]
