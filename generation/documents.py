"""Join the plan with its generation results into Documents (the filter stage's input)."""

from __future__ import annotations

from collections.abc import MutableMapping, Sequence

import numpy as np

from booksmith.schemas import Document, GenerationRequest, GenerationResult
from booksmith.shards.encodings import count_tokens, get_encoding
from booksmith.shards.tokens import encode_texts


def to_documents(
    plan: Sequence[GenerationRequest],
    results: Sequence[GenerationResult],
    *,
    run_id: str,
    encoding: str = "cl100k_base",
    token_ids: MutableMapping[str, np.ndarray] | None = None,
) -> tuple[list[Document], list[GenerationResult]]:
    """(documents in plan order, failures). Results for requests not in the plan are a bug.
    `n_tokens` counts each text's tokens under `encoding`; given `token_ids`, the tokens
    themselves go there by document id (a run stores them instead of encoding again)."""
    by_id = {r.request_id: r for r in results}
    assert set(by_id) <= {req.id for req in plan}, "results for requests outside the plan"
    pairs = [(req, by_id[req.id]) for req in plan if req.id in by_id and by_id[req.id].ok]
    failures = [by_id[req.id] for req in plan if req.id in by_id and not by_id[req.id].ok]
    texts = [res.text for _, res in pairs]
    if token_ids is None:
        n_tokens = count_tokens(texts, encoding) if pairs else []
    else:
        arrays = encode_texts(get_encoding(encoding), texts) if pairs else []
        n_tokens = [len(a) for a in arrays]
    docs = [
        Document.from_generation(req, res, run_id=run_id, n_tokens=n)
        for (req, res), n in zip(pairs, n_tokens, strict=True)
    ]
    if token_ids is not None:
        token_ids.update(zip((d.id for d in docs), arrays, strict=True))
    return docs, failures
