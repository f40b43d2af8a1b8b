"""Gopher quality rules: word counts, word length, symbols, bullets, ellipses, stop words.

Source: Rae et al. 2021, "Scaling Language Models: Methods, Analysis & Insights from Training
Gopher", appendix A ("MassiveWeb" quality filters); thresholds as in datatrove's
GopherQualityFilter. Words are whitespace-separated tokens.

Rules (reason, default threshold):
- `too_short:words`                  fewer than 50 words (a grounded document: its recipe's
                                     `min_words` in prompts/recipes.yaml, where it sets one)
- `quality_rule:too_many_words`      more than 100,000 words
- `quality_rule:mean_word_length`    mean word length (punctuation stripped) outside [3, 10]
- `quality_rule:symbol_word_ratio`   hash-words ("#", "##", ...) or ellipses per word > 0.1
                                     (a markdown heading counts once, not per "#")
- `quality_rule:bullet_lines`        more than 90% of lines start with a bullet
- `quality_rule:ellipsis_lines`      more than 30% of lines end with an ellipsis
- `quality_rule:alpha_words`         fewer than 80% of words contain a letter
- `quality_rule:stop_words`          fewer than 2 of the, be, to, of, and, that, have, with
"""

from __future__ import annotations

import string
from typing import Any

from booksmith.filters.scored import RuleFilter, Verdict
from booksmith.prompts.recipes import load_recipes
from booksmith.schemas import Document
from booksmith.schemas.filter_settings import GopherQualitySettings

STOP_WORDS = frozenset({"the", "be", "to", "of", "and", "that", "have", "with"})
BULLETS = ("•", "●", "○", "■", "□", "▪", "▫", "–", "‣", "⁃", "◦", "-", "*")
_STRIP = string.punctuation + "“”‘’«»…—–"


def check(
    text: str, s: GopherQualitySettings, min_words: int | None = None
) -> tuple[str, dict[str, Any]] | None:
    """The first rule `text` breaks, with its measured value and threshold; None if none.
    `min_words` replaces `s.min_words` (a grounded document's recipe's own minimum)."""
    words = text.split()
    n = len(words)
    minimum = s.min_words if min_words is None else min_words
    if n < minimum:
        return "too_short:words", {"words": n, "min": minimum}
    if n > s.max_words:
        return "quality_rule:too_many_words", {"words": n, "max": s.max_words}
    stripped = [w.strip(_STRIP) for w in words]
    lengths = [len(w) for w in stripped if w]
    mean = sum(lengths) / len(lengths) if lengths else 0.0
    if not s.min_avg_word_length <= mean <= s.max_avg_word_length:
        limits = [s.min_avg_word_length, s.max_avg_word_length]
        return "quality_rule:mean_word_length", {"value": round(mean, 3), "range": limits}
    hashes = sum(1 for w in words if w[0] == "#" and w.strip("#") == "")
    ellipses = text.count("...") + text.count("…")
    ratio = max(hashes, ellipses) / n
    if ratio > s.max_symbol_word_ratio:
        return "quality_rule:symbol_word_ratio", {
            "value": round(ratio, 4),
            "max": s.max_symbol_word_ratio,
        }
    lines = [line.strip() for line in text.splitlines()]
    lines = [line for line in lines if line]
    if lines:
        bullets = sum(1 for line in lines if line.startswith(BULLETS)) / len(lines)
        if bullets > s.max_bullet_lines_ratio:
            return "quality_rule:bullet_lines", {
                "value": round(bullets, 4),
                "max": s.max_bullet_lines_ratio,
            }
        dots = sum(1 for line in lines if line.endswith(("...", "…"))) / len(lines)
        if dots > s.max_ellipsis_lines_ratio:
            return "quality_rule:ellipsis_lines", {
                "value": round(dots, 4),
                "max": s.max_ellipsis_lines_ratio,
            }
    alpha = sum(map(_has_letter, words)) / n if n else 1.0
    if alpha < s.min_alpha_words_ratio:
        return "quality_rule:alpha_words", {
            "value": round(alpha, 4),
            "min": s.min_alpha_words_ratio,
        }
    if s.min_stop_words:
        found = 0
        for w in stripped:
            if w.lower() in STOP_WORDS:
                found += 1
                if found >= s.min_stop_words:
                    break
        if found < s.min_stop_words:
            return "quality_rule:stop_words", {"value": found, "min": s.min_stop_words}
    return None


def _has_letter(word: str) -> bool:
    if word.isalpha():  # the common case, in C
        return True
    return any(c.isalpha() for c in word)


class GopherQualityFilter(RuleFilter):
    name = "gopher_quality"

    def __init__(
        self,
        settings: GopherQualitySettings | None = None,
        recipe_min_words: dict[str, int] | None = None,
    ) -> None:
        self.settings = settings or GopherQualitySettings()
        # recipe -> its own minimum (the bundled recipes' unless given)
        if recipe_min_words is None:
            recipes = load_recipes().items()
            recipe_min_words = {k: r.min_words for k, r in recipes if r.min_words is not None}
        self.recipe_min_words = recipe_min_words

    def check(self, doc: Document) -> Verdict:
        own = self.recipe_min_words.get(doc.recipe) if doc.recipe is not None else None
        verdict = check(doc.text, self.settings, own)
        if own is not None and verdict is not None and verdict[0] == "too_short:words":
            verdict[1]["recipe"] = doc.recipe  # whose minimum it was
        return verdict
