"""The filter stage contract: documents in, documents out, plus what was dropped and why.

A filter never loses a document silently: each one it drops becomes a `Rejected` record with a
`<family>:<rule>` reason, written to the rejected shards. Filters are plain classes with no
Prefect in them; flows/ chains them.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from booksmith.schemas import Document, Rejected


@dataclass
class StageOutput:
    kept: list[Document] = field(default_factory=list)
    rejected: list[Rejected] = field(default_factory=list)

    def reject(
        self,
        doc: Document,
        reason: str,
        duplicate_of: str | None = None,
        detail: dict[str, Any] | None = None,
    ) -> None:
        """`detail`: the figures that decided it, kept as JSON in the rejected shards."""
        text = None if detail is None else json.dumps(detail, ensure_ascii=False)
        self.rejected.append(
            Rejected(**doc.model_dump(), reason=reason, duplicate_of=duplicate_of, detail=text)
        )

    @property
    def counts(self) -> dict[str, int]:
        return dict(Counter(r.reason for r in self.rejected))


class Filter(Protocol):
    name: str

    def run(self, docs: Sequence[Document]) -> StageOutput: ...


@dataclass
class ChainResult:
    kept: list[Document]
    rejected: list[Rejected]
    counts: dict[str, dict[str, int]]  # per filter: input, kept, and each reason


def run_chain(docs: Sequence[Document], filters: Sequence[Filter]) -> ChainResult:
    """Run filters in order; each sees only what the previous kept."""
    kept = list(docs)
    rejected: list[Rejected] = []
    counts: dict[str, dict[str, int]] = {}
    for f in filters:
        out = f.run(kept)
        counts[f.name] = {"input": len(kept), "kept": len(out.kept), **out.counts}
        assert len(out.kept) + len(out.rejected) == len(kept), f"{f.name} lost documents"
        kept = out.kept
        rejected.extend(out.rejected)
    return ChainResult(kept=kept, rejected=rejected, counts=counts)
