"""C4 and FineWeb line rules: terminal punctuation, short lines, newline density, lorem ipsum.

Sources: Raffel et al. 2020 (C4: "lorem ipsum" pages dropped; lines kept only if they end in
terminal punctuation) and Penedo et al. 2024 (FineWeb's custom filters, which keep a document
unless few of its lines end in punctuation or most of them are short). C4 removes offending
lines; here a document is kept or dropped whole, so generated text is never edited.

Rules (reason, default threshold):
- `quality_rule:line_punct`     lines ending in . ! ? " ' ) : ; or a closing fence / all lines
                                < 0.12 (FineWeb). Markdown headings, list items and code are
                                the other lines: textbook text passes easily.
- `quality_rule:short_lines`    lines under 30 characters / all lines > 0.67 (FineWeb)
- `quality_rule:newline_ratio`  newlines per word > 0.3 (FineWeb)
- `quality_rule:lorem_ipsum`    "lorem ipsum" anywhere (C4), case-insensitive
"""

from __future__ import annotations

from typing import Any

from booksmith.filters.scored import RuleFilter, Verdict
from booksmith.schemas import Document
from booksmith.schemas.filter_settings import LineSettings

TERMINAL = (".", "!", "?", '"', "'", ")", ":", ";", "”", "’", "```", "。")


def check(text: str, s: LineSettings) -> tuple[str, dict[str, Any]] | None:
    """The first rule `text` breaks, with its measured value and threshold; None if none."""
    if s.lorem_ipsum and "lorem ipsum" in text.lower():
        return "quality_rule:lorem_ipsum", {}
    lines = [line.strip() for line in text.splitlines()]
    lines = [line for line in lines if line]
    if not lines:
        return None
    punct = sum(1 for line in lines if line.endswith(TERMINAL)) / len(lines)
    if punct < s.min_line_punct_ratio:
        return "quality_rule:line_punct", {"value": round(punct, 4), "min": s.min_line_punct_ratio}
    short = sum(1 for line in lines if len(line) < s.short_line_chars) / len(lines)
    if short > s.max_short_line_ratio:
        return "quality_rule:short_lines", {"value": round(short, 4), "max": s.max_short_line_ratio}
    n_words = len(text.split())
    newlines = text.count("\n") / n_words if n_words else 0.0
    if newlines > s.max_newline_word_ratio:
        return "quality_rule:newline_ratio", {
            "value": round(newlines, 4),
            "max": s.max_newline_word_ratio,
        }
    return None


class LineFilter(RuleFilter):
    name = "lines"

    def __init__(self, settings: LineSettings | None = None) -> None:
        self.settings = settings or LineSettings()

    def check(self, doc: Document) -> Verdict:
        return check(doc.text, self.settings)
