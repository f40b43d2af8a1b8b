"""A StageOutput that also keeps, for each rejected document, the figures that decided it.

`Rejected` carries `reason` only; the measured value, its threshold, a matched benchmark span
and so on go into `details` (parallel to `rejected`), which the CLI writes as the JSON column
`detail` of rejected.parquet. Scores that are Document columns (`lang_score`, `quality_score`)
are set on the document itself before it is rejected.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from booksmith.filters.base import ChainResult, Filter, StageOutput
from booksmith.schemas import Document, Rejected


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
        super().reject(doc, reason, duplicate_of)
        self.details.append(detail)
        if detail is not None:
            self.rejected[-1].detail = json.dumps(detail, ensure_ascii=False)


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


@dataclass
class DetailedChainResult(ChainResult):
    details: list[str | None] = field(default_factory=list)  # JSON, parallel to `rejected`


def run_detailed(docs: Sequence[Document], filters: Sequence[Filter]) -> DetailedChainResult:
    """`run_chain`, keeping each rejection's detail (filters without details give None)."""
    kept = list(docs)
    rejected: list[Rejected] = []
    details: list[str | None] = []
    counts: dict[str, dict[str, int]] = {}
    for f in filters:
        out = f.run(kept)
        counts[f.name] = {"input": len(kept), "kept": len(out.kept), **out.counts}
        assert len(out.kept) + len(out.rejected) == len(kept), f"{f.name} lost documents"
        extra = out.details if isinstance(out, ScoredOutput) else [None] * len(out.rejected)
        kept = out.kept
        rejected.extend(out.rejected)
        details.extend(json.dumps(d, ensure_ascii=False) if d is not None else None for d in extra)
    return DetailedChainResult(kept=kept, rejected=rejected, counts=counts, details=details)
