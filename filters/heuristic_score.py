"""A quality score in [0, 1] from the heuristic filters' own measures, for routing source
passages where no quality classifier is trained (grounding.routes bands).

The mean of four signals the Gopher and C4/FineWeb rules threshold, each read as a degree
instead of a pass/fail: the density of the Gopher stop words (full marks from 15% of words,
about what running English prose has), the share of lines ending in terminal punctuation, the
share of words with a letter, and the share of lines that are not short. Prose scores high;
code, grammar listings, tables and link lists score low, as Nemotron-CC's classifier bands them.
"""

from __future__ import annotations

from booksmith.filters.gopher_quality import _STRIP, STOP_WORDS, _has_letter
from booksmith.filters.lines import TERMINAL
from booksmith.schemas.filter_settings import LineSettings

STOP_WORD_DENSITY = 0.15  # the density that scores full marks


def heuristic_score(text: str, lines: LineSettings | None = None) -> float:
    words = text.split()
    rows = [r.strip() for r in text.splitlines() if r.strip()]
    if not words or not rows:
        return 0.0
    short = (lines or LineSettings()).short_line_chars
    stops = sum(1 for w in words if w.strip(_STRIP).lower() in STOP_WORDS) / len(words)
    signals = (
        min(1.0, stops / STOP_WORD_DENSITY),
        sum(1 for r in rows if r.endswith(TERMINAL)) / len(rows),
        sum(map(_has_letter, words)) / len(words),
        sum(1 for r in rows if len(r) >= short) / len(rows),
    )
    return round(sum(signals) / len(signals), 4)
