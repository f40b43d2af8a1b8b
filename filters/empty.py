"""Drop documents with no text (an empty or whitespace-only completion).

Rule: `text.strip() == ""` -> reason `empty:no_text`. No threshold. Truncated outputs are kept
and marked (`truncated`, `finish_reason == "length"`); the heuristics decide about them.
"""

from __future__ import annotations

from collections.abc import Sequence

from booksmith.filters.base import StageOutput
from booksmith.schemas import Document


class EmptyFilter:
    name = "empty"

    def run(self, docs: Sequence[Document]) -> StageOutput:
        out = StageOutput()
        for doc in docs:
            if doc.text.strip():
                out.kept.append(doc)
            else:
                out.reject(doc, "empty:no_text")
        return out
