"""Faithfulness of grounded documents to the passage they were written from (issue 18).

A grounded document's request quotes its source passage inside the recipe's `<text>` or
`<extract>` tags (prompts/recipes/*.j2), so the passage is read back from the document's own
prompt: no source is opened again. Three rules, each a `grounding:<rule>` reason with its
figures in the rejected record's detail; documents without a source pass untouched:

- copied: the longest run of words the document shares verbatim with the passage. A
  rephrasing that copies a long stretch teaches the model nothing new and carries the source's
  wording (its licence) into the corpus. Runs are found with the decontamination filter's
  n-gram index (filters/decontam.py: its normalised words, 64-bit hashes of word 8-grams over
  the passage), so a run is at least 8 words.
- unsupported: numbers and capitalised names (not at a sentence start) the passage does not
  contain: what a small model invents when it rephrases ("in 1887", "Dr. Smith").
- off_source: the share of the document's content words (4+ letters, no stop word) found in the
  passage; a document about something else has little in common with its source.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from booksmith.filters.decontam import NgramIndex, normalise
from booksmith.filters.scored import RuleFilter, Verdict
from booksmith.schemas import Document
from booksmith.schemas.filter_settings import FaithfulnessSettings

TAGS = (("<text>\n", "\n</text>"), ("<extract>\n", "\n</extract>"))
NGRAM = 8
_WORD = re.compile(r"\w+", re.UNICODE)
_NUMBER = re.compile(r"\d+(?:[.,]\d+)*")
_CAPITALISED = re.compile(r"\b[A-Z][a-z]{2,}\b")
SENTENCE_ENDS = ".!?:*#>-"  # a capitalised word after these (or a line start) opens a sentence
STOP = frozenset(
    _WORD.findall(
        "this that with from have they their there which when what will would about into than "
        "then them these those were been being also such each some more most other only over "
        "very just like your where while because between through after before under both many "
        "much does"
    )
)


def names(text: str) -> set[str]:
    """Capitalised words that do not open a sentence or a line: names, by a rough rule."""
    found = set()
    for m in _CAPITALISED.finditer(text):
        # the character before the word, past spaces and tabs, read in place (no copy of the
        # text before it, which made this quadratic in a document's length)
        i = m.start() - 1
        while i >= 0 and text[i] in " \t":
            i -= 1
        if i >= 0 and text[i] != "\n" and text[i] not in SENTENCE_ENDS:
            found.add(m.group())
    return found


def passage_of(doc: Document) -> str | None:
    """The source passage a grounded document's prompt quotes (None: not grounded, or a
    prompt without the recipe tags)."""
    if doc.source_id is None:
        return None
    for start_tag, end_tag in TAGS:
        start = doc.prompt.find(start_tag)
        end = doc.prompt.rfind(end_tag)
        if start >= 0 and end > start:
            return doc.prompt[start + len(start_tag) : end]
    return None


def _words(text: str) -> list[str]:
    return [w.lower() for w in _WORD.findall(text)]


def longest_copied_run(text: str, passage: str) -> int:
    """The longest run of words `text` shares verbatim (case-folded) with `passage`; 0 when
    no run reaches NGRAM words."""
    index = NgramIndex()
    index.add(normalise(passage), NGRAM, 0)
    best = 0
    for _, positions, _ in index.hits(normalise(text)):
        if len(positions):
            # consecutive copied windows are one run: its length is its windows + NGRAM - 1
            breaks = np.flatnonzero(np.diff(positions) != 1)
            starts = np.concatenate(([0], breaks + 1))
            ends = np.concatenate((breaks, [len(positions) - 1]))
            best = int((ends - starts).max()) + NGRAM
    return best


def unsupported(text: str, passage: str) -> dict[str, list[str]]:
    """Numbers and names in `text` that `passage` does not contain."""
    numbers = {n.replace(",", "") for n in _NUMBER.findall(passage)}
    known = set(_words(passage))
    return {
        "numbers": sorted({n for n in _NUMBER.findall(text) if n.replace(",", "") not in numbers}),
        "names": sorted(n for n in names(text) if n.lower() not in known),
    }


def overlap(text: str, passage: str) -> float:
    """The share of `text`'s content words that `passage` contains (1.0 when it has none)."""
    content = [w for w in _words(text) if len(w) >= 4 and w not in STOP and not w.isdigit()]
    if not content:
        return 1.0
    known = set(_words(passage))
    return sum(w in known for w in content) / len(content)


class FaithfulnessFilter(RuleFilter):
    name = "faithfulness"

    def __init__(self, settings: FaithfulnessSettings) -> None:
        self.s = settings

    def check(self, doc: Document) -> Verdict:
        passage = passage_of(doc)
        if passage is None:
            return None
        run = longest_copied_run(doc.text, passage)
        if run > self.s.max_copied_words:
            return "grounding:copied", {"copied_words": run, "max": self.s.max_copied_words}
        missing = unsupported(doc.text, passage)
        n = len(missing["numbers"]) + len(missing["names"])
        if n > self.s.max_unsupported:
            detail: dict[str, Any] = {k: v[:10] for k, v in missing.items()}
            return "grounding:unsupported", {**detail, "count": n, "max": self.s.max_unsupported}
        share = overlap(doc.text, passage)
        if share < self.s.min_overlap:
            return "grounding:off_source", {"overlap": round(share, 3), "min": self.s.min_overlap}
        return None
