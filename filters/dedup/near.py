"""MinHash near-dedup: drop documents whose word 5-gram sets are close to a kept or earlier one.

Rule: MinHash signatures of word 5-gram shingles (112 permutations), LSH in 14 bands of 8 rows
(datatrove's MinHash defaults, as used for Cosmopedia; datasketch-compatible signatures), each
band candidate confirmed by its estimated Jaccard similarity >= threshold (default the band
threshold (1/14)^(1/8) ~ 0.72), clusters by union-find. Drops get reason `dedup_minhash` and
`duplicate_of` = the document kept for the cluster (highest `quality_score`, then earliest) or
the most similar indexed document of an earlier run.
"""

from __future__ import annotations

from collections.abc import Sequence

from booksmith.filters.base import StageOutput
from booksmith.filters.dedup.engine import Verdict, find_near
from booksmith.filters.dedup.exact import apply_verdicts
from booksmith.filters.dedup.index import DedupIndex
from booksmith.filters.dedup.normalize import words
from booksmith.schemas import Document
from booksmith.schemas.dedup_settings import DedupSettings


class MinHashDedup:
    """Within-run near-dedup, also against a persistent index (read only: see `commit`)."""

    name = "dedup_minhash"

    def __init__(
        self, settings: DedupSettings | None = None, index: DedupIndex | None = None
    ) -> None:
        self.settings = settings or DedupSettings()
        self.index = index

    def run(self, docs: Sequence[Document]) -> StageOutput:
        verdicts: list[Verdict | None] = [None] * len(docs)
        find_near(
            [d.id for d in docs],
            [words(d.text) for d in docs],
            [d.quality_score for d in docs],
            verdicts,
            self.settings,
            self.index,
        )
        return apply_verdicts(docs, verdicts)
