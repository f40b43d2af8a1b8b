"""Join the plan with its generation results into Documents (the filter stage's input)."""

from __future__ import annotations

from collections.abc import Sequence

from booksmith.schemas import Document, GenerationRequest, GenerationResult
from booksmith.shards.encodings import count_tokens


def to_documents(
    plan: Sequence[GenerationRequest],
    results: Sequence[GenerationResult],
    *,
    run_id: str,
    encoding: str = "cl100k_base",
) -> tuple[list[Document], list[GenerationResult]]:
    """(documents in plan order, failures). Results for requests not in the plan are a bug."""
    by_id = {r.request_id: r for r in results}
    assert set(by_id) <= {req.id for req in plan}, "results for requests outside the plan"
    pairs = [(req, by_id[req.id]) for req in plan if req.id in by_id and by_id[req.id].ok]
    failures = [by_id[req.id] for req in plan if req.id in by_id and not by_id[req.id].ok]
    n_tokens = count_tokens([res.text for _, res in pairs], encoding) if pairs else []
    docs = [
        Document.from_generation(req, res, run_id=run_id, n_tokens=n)
        for (req, res), n in zip(pairs, n_tokens, strict=True)
    ]
    return docs, failures
