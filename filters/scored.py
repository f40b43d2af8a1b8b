"""A StageOutput that also keeps, for each rejected document, the figures that decided it.

The measured value, its threshold, a matched benchmark span and so on go into each rejected
record's `detail` (JSON, the column of rejected.parquet), and into `details` (parallel to
`rejected`, for tests and callers that want the figures unparsed). Scores that are Document
columns (`lang_score`, `quality_score`) are set on the document itself before it is rejected.
One runner, `filters.base.run_chain`, serves every caller.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from booksmith.filters.base import StageOutput
from booksmith.schemas import Document


@dataclass
class ScoredOutput(StageOutput):
    details: list[dict[str, Any] | None] = field(default_factory=list)

    def reject(
        self,
        doc: Document,
        reason: str,
        duplicate_of: str | None = None,
        detail: dict[str, Any] | None = None,
    ) -> None:
        super().reject(doc, reason, duplicate_of, detail)
        self.details.append(detail)


Verdict = tuple[str, dict[str, Any]] | None  # (reason, the figures that decided it), or keep


class RuleFilter:
    """A filter that judges one document at a time: subclasses give `name` and `check`."""

    name: str

    def check(self, doc: Document) -> Verdict:
        raise NotImplementedError

    def run(self, docs: Sequence[Document]) -> ScoredOutput:
        out = ScoredOutput()
        for doc in docs:
            broken = self.check(doc)
            if broken is None:
                out.kept.append(doc)
            else:
                out.reject(doc, broken[0], detail=broken[1])
        return out
