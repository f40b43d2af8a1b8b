"""An LLM judge scores documents for educational value on an additive 0-5 rubric.

Source: FineWeb-Edu (Penedo et al. 2024) prompted Llama-3-70B with an additive rubric (one point
per criterion met, "Educational score: <points>" at the end); Phi-1 asked GPT-4 a similar
question. Requests go through `generation.client.GenerationClient`: any OpenAI-compatible
backend, the durable response cache (a rerun asks nothing twice), limits, retries, budget.

The judge is asked for structured output by default (`JUDGE_FORMAT`: a short reason, then the
score as an enum), so even SmolLM2-135M's replies parse; an endpoint that rejects
`response_format` is asked again in plain text, and the rubric's "Educational score: N" line is
parsed from the prose. A reply without a parsable score is kept with `score = None` and its
`error`, never dropped.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import fields
from datetime import UTC, datetime
from pathlib import Path

import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field

from booksmith.generation.cache import ResponseCache
from booksmith.generation.client import (
    RESPONSE_FORMAT_REJECTED,
    Endpoint,
    GenerationClient,
    GenerationReport,
)
from booksmith.prompts import prompt_text
from booksmith.schemas import Document, GenerationRequest, Sampling
from booksmith.schemas.arrow import arrow_schema, to_table
from booksmith.schemas.config import Budget
from booksmith.shards.files import write_table_atomically

RUBRIC_VERSION = "edu-additive-v1"
RUBRIC = prompt_text(f"judge/{RUBRIC_VERSION}.txt")  # the judge's prompt, as data

_SCORE = re.compile(r"educational score\W{0,5}([0-5])\b", re.IGNORECASE)
_LOOSE = re.compile(r"\bscore\W{0,5}([0-5])\b", re.IGNORECASE)

# The judge's structured answer: the reason first (the rubric asks to justify, then score),
# bounded so it cannot use up max_tokens before the score.
JUDGE_FORMAT: dict[str, object] = {
    "type": "json_schema",
    "json_schema": {
        "name": "educational_score",
        "strict": True,
        "schema": {
            "type": "object",
            "properties": {
                "reason": {"type": "string", "maxLength": 300},
                "score": {"type": "integer", "enum": [0, 1, 2, 3, 4, 5]},
            },
            "required": ["reason", "score"],
            "additionalProperties": False,
        },
    },
}


class Annotation(BaseModel):
    """One judgement: a row of `_state/quality/annotations.parquet`."""

    model_config = ConfigDict(extra="forbid")

    id: str
    text: str
    score: int | None  # 0-5; None when the reply had no score
    judge: str  # model name
    backend: str
    rubric_version: str
    request_id: str
    response: str
    error: str | None = None
    created_at: datetime = Field(default_factory=lambda: datetime.now(UTC))


def parse_score(reply: str) -> int | None:
    """The score the judge gave: a structured answer's `score`, else "Educational score: N"
    (the last one), else "score: N"."""
    if reply.lstrip().startswith("{"):
        try:
            score = json.loads(reply).get("score")
        except (ValueError, AttributeError):
            score = None
        if isinstance(score, int) and not isinstance(score, bool) and 0 <= score <= 5:
            return score
    found = _SCORE.findall(reply) or _LOOSE.findall(reply)
    return int(found[-1]) if found else None


def sample(docs: Sequence[Document], n: int, seed: int = 0) -> list[Document]:
    """A deterministic sample of n documents (by a seeded hash of their ids)."""

    def key(doc: Document) -> str:
        return hashlib.sha256(f"{seed}:{doc.id}".encode()).hexdigest()

    return sorted(docs, key=key)[:n]


def build_requests(
    docs: Sequence[Document],
    model: str,
    *,
    max_tokens: int = 256,
    max_chars: int = 6_000,
    structured: bool = False,
) -> list[GenerationRequest]:
    sampling = Sampling(max_tokens=max_tokens, temperature=0.0, top_p=1.0, seed=0)
    fmt = json.dumps(JUDGE_FORMAT) if structured else None
    return [
        GenerationRequest.build(
            messages=[{"role": "user", "content": RUBRIC.format(text=doc.text[:max_chars])}],
            model=model,
            sampling=sampling,
            response_format=fmt,
            topic=doc.id,
            template=RUBRIC_VERSION,
        )
        for doc in docs
    ]


def annotate(
    docs: Sequence[Document],
    endpoint: Endpoint,
    *,
    cache: ResponseCache | None = None,
    budget: Budget | None = None,
    max_tokens: int = 256,
    max_chars: int = 6_000,
    structured: bool = True,
    run_id: str = "annotate",
) -> tuple[list[Annotation], GenerationReport]:
    """Judge every document; returns one Annotation per document answered, and the report.

    Documents the budget skipped or whose request failed get an Annotation with `error` set.
    With `structured`, the documents whose request the endpoint rejected for its
    response_format are asked again in plain text (the report counts both requests)."""
    client = GenerationClient(endpoint, cache=cache, run_id=run_id, budget=budget)
    requests = build_requests(
        docs, endpoint.model, max_tokens=max_tokens, max_chars=max_chars, structured=structured
    )
    report = asyncio.run(client.run(requests))
    by_request = {r.request_id: r for r in report.results}
    rejected = [
        i for i, req in enumerate(requests)
        if (r := by_request.get(req.id)) is not None and r.error == RESPONSE_FORMAT_REJECTED
    ]  # fmt: skip
    if rejected:
        again = build_requests(
            [docs[i] for i in rejected], endpoint.model, max_tokens=max_tokens,
            max_chars=max_chars,
        )  # fmt: skip
        plain = asyncio.run(client.run(again))
        by_request.update({r.request_id: r for r in plain.results})
        for i, req in zip(rejected, again, strict=True):
            requests[i] = req
        _add_counts(report, plain)
        # a rejected structured request was asked again: not a failure of its document
        report.failed -= len(rejected)
        report.failures[RESPONSE_FORMAT_REJECTED] -= len(rejected)
        report.failures += Counter()  # drops the zero
    out = []
    for doc, req in zip(docs, requests, strict=True):
        result = by_request.get(req.id)
        if result is None:
            error: str | None = "skipped_budget"
            reply, score = "", None
        elif not result.ok:
            error, reply, score = result.error, "", None
        else:
            reply = result.text
            score = parse_score(reply)
            error = None if score is not None else "no_score_in_reply"
        out.append(
            Annotation(
                id=doc.id,
                text=doc.text,
                score=score,
                judge=endpoint.model,
                backend=endpoint.backend,
                rubric_version=RUBRIC_VERSION,
                request_id=req.id,
                response=reply,
                error=error,
            )
        )
    return out, report


def _add_counts(report: GenerationReport, other: GenerationReport) -> None:
    """`other`'s counts added to `report`'s (the plain retries of a structured run)."""
    for f in fields(report):
        if f.name in ("planned", "started_at"):
            continue
        value = getattr(report, f.name)
        if isinstance(value, int | float) and not isinstance(value, bool):
            setattr(report, f.name, value + getattr(other, f.name))
    report.failures.update(other.failures)
    report.results.extend(other.results)


def save_annotations(path: Path, annotations: Sequence[Annotation]) -> int:
    """Merge into the annotations file (a newer judgement of an id replaces the older one);
    returns the number of rows now in it. Written atomically."""
    merged: dict[str, Annotation] = {}
    if path.is_file():
        for row in pq.read_table(path, schema=arrow_schema(Annotation)).to_pylist():
            merged[row["id"]] = Annotation.model_validate(row)
    for a in annotations:
        merged[a.id] = a
    rows = list(merged.values())
    write_table_atomically(to_table(rows, Annotation), path)
    return len(rows)
