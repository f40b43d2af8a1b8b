"""Records to Arrow: the column-by-column `to_table` gives the table the plain way gives."""

from __future__ import annotations

import pyarrow as pa
import pytest
from pydantic import BaseModel

from booksmith.schemas import (
    Document,
    GenerationRequest,
    GenerationResult,
    Message,
    Rejected,
    Sampling,
)
from booksmith.schemas.arrow import arrow_schema, to_table
from booksmith.schemas.records import GROUNDING_COLUMNS, Grounding
from tests.filters_helpers import document


def plain(records: list[BaseModel], model: type[BaseModel]) -> pa.Table:
    return pa.Table.from_pylist([r.model_dump() for r in records], schema=arrow_schema(model))


class Inner(BaseModel):
    name: str
    score: float | None = None


class Outer(BaseModel):
    id: str
    inner: Inner | None = None
    items: list[Inner] | None = None
    tags: list[str] = []


def requests() -> list[GenerationRequest]:
    system = Message(role="system", content="You teach.")
    return [
        GenerationRequest.build(
            messages=[system, Message(role="user", content="Explain é {x}")] if i % 2 else
            [{"role": "user", "content": f"prompt {i}"}],
            model="m",
            sampling=Sampling(frequency_penalty=0.5 if i % 3 else None),
            sample_index=i,
            topic_path=["a", "b"][: i % 3],
            subject=None if i % 2 else "Biology",
            seed_words=["w"] * (i % 4),
        )
        for i in range(12)
    ]  # fmt: skip


@pytest.mark.parametrize(
    "records, model",
    [
        (requests(), GenerationRequest),
        ([GenerationResult(request_id="a", text="x"), GenerationResult(request_id="b",
          error="timeout", finish_reason=None)], GenerationResult),
        ([document("d1", "Some text."), document("d2", "", subject="Bio", lang=None,
          quality_score=0.5)], Document),
        ([Rejected(**document("d", "t").model_dump(), reason="dedup_exact", duplicate_of="e"),
          Rejected(**document("e", "u").model_dump(), reason="heuristic:short")], Rejected),
        ([Outer(id="a"), Outer(id="b", inner=Inner(name="i", score=1.0), items=[]),
          Outer(id="c", items=[Inner(name="x"), Inner(name="y", score=2.0)], tags=["t"]),
          Outer(id="d", inner=Inner(name="j"))], Outer),
        ([], GenerationRequest),
    ],
)  # fmt: skip
def test_to_table_equals_dumping_every_record(records: list[BaseModel], model: type) -> None:
    table = to_table(records, model)
    assert table.schema == arrow_schema(model)
    assert table.equals(plain(records, model))
    assert table.to_pylist() == [r.model_dump() for r in records]


# The columns of the shards written so far, in their order: the grounding columns are declared
# once (schemas/records.Grounding) and come after each record's own, before Rejected's.
REQUEST_OWN = ["id", "model", "messages", "sampling", "sample_index", "topic", "topic_path",
               "subject", "audience", "style", "format", "seed_words", "template",
               "response_format"]  # fmt: skip
DOCUMENT_OWN = ["id", "text_sha256", "text", "topic", "topic_path", "subject", "audience",
                "style", "format", "seed_words", "prompt", "model", "backend", "sampling", "seed",
                "sample_index", "finish_reason", "truncated", "n_tokens", "lang", "lang_score",
                "quality_score", "run_id", "created_at"]  # fmt: skip
GROUNDING = ["source_id", "source_passage", "source_start", "source_end", "source_name",
             "source_checksum", "license", "recipe", "template_version"]  # fmt: skip


def test_the_grounding_columns_follow_each_records_own_in_the_written_order() -> None:
    assert list(GROUNDING_COLUMNS) == GROUNDING
    assert arrow_schema(GenerationRequest).names == REQUEST_OWN + GROUNDING
    assert arrow_schema(Document).names == DOCUMENT_OWN + GROUNDING
    assert arrow_schema(Rejected).names == [*DOCUMENT_OWN, *GROUNDING,
                                            "reason", "duplicate_of", "detail"]  # fmt: skip
    for model in (GenerationRequest, Document):
        schema = arrow_schema(model)
        assert [schema.field(c) for c in GROUNDING] == list(arrow_schema(Grounding))
        assert all(schema.field(c).nullable for c in GROUNDING)
