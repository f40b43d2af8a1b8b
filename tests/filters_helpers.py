"""Helpers shared by the filter tests: documents from text, fixture paths."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from schemas import Document
from schemas.records import sha256_hex
from shards.encodings import count_tokens

FIXTURES = Path(__file__).parent / "fixtures"
TEXTBOOK = (FIXTURES / "textbook_sample.md").read_text(encoding="utf-8")
MMLU = FIXTURES / "benchmarks" / "mmlu_mini.jsonl"
GSM8K = FIXTURES / "benchmarks" / "gsm8k_mini.csv"
LABELLED = FIXTURES / "quality_labelled.jsonl"


def make_doc(text: str, id: str = "doc", finish_reason: str | None = "stop") -> Document:
    return Document(
        id=id,
        text_sha256=sha256_hex(text),
        text=text,
        topic="photosynthesis",
        topic_path=["biology", "photosynthesis"],
        audience="students",
        style="textbook",
        format="chapter",
        seed_words=[],
        prompt="Write a chapter.",
        model="test",
        backend="test",
        sampling="{}",
        seed=0,
        sample_index=0,
        finish_reason=finish_reason,
        truncated=finish_reason == "length",
        n_tokens=count_tokens([text])[0] if text else 0,
        run_id="run",
        created_at=datetime.now(UTC),
    )
