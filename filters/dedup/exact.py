"""Exact dedup: drop documents whose normalised text equals a kept or earlier one.

Rule: two documents are duplicates when their texts are equal after `normalize.words` (Unicode
NFKC, lowercase, punctuation/symbols/whitespace folded into single word boundaries), compared by
a stable 64-bit BLAKE2b key. Source: the exact-substring/document dedup step common to
Gopher/RefinedWeb/datatrove pipelines, here at document level. No threshold. Drops get reason
`dedup_exact` and `duplicate_of` = the kept document's id (within the run: highest
`quality_score`, then earliest) or the id of the indexed document from an earlier run.
"""

from __future__ import annotations

from collections.abc import Sequence

from booksmith.filters.base import StageOutput
from booksmith.filters.dedup.engine import Verdict, find_exact
from booksmith.filters.dedup.index import DedupIndex
from booksmith.filters.dedup.normalize import words
from booksmith.schemas import Document


def apply_verdicts(docs: Sequence[Document], verdicts: Sequence[Verdict | None]) -> StageOutput:
    out = StageOutput()
    for doc, v in zip(docs, verdicts, strict=True):
        if v is None:
            out.kept.append(doc)
        else:
            out.reject(doc, v.reason, duplicate_of=v.duplicate_of)
    return out


class ExactDedup:
    """Within-run exact dedup, also against a persistent index (read only: see `commit`)."""

    name = "dedup_exact"

    def __init__(self, index: DedupIndex | None = None) -> None:
        self.index = index

    def run(self, docs: Sequence[Document]) -> StageOutput:
        verdicts: list[Verdict | None] = [None] * len(docs)
        find_exact(
            [d.id for d in docs],
            [words(d.text) for d in docs],
            [d.quality_score for d in docs],
            verdicts,
            self.index,
        )
        return apply_verdicts(docs, verdicts)
