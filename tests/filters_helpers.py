"""Helpers shared by the filter tests: documents from text, fixture paths."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from booksmith.schemas import Document
from booksmith.schemas.records import sha256_hex
from booksmith.shards.encodings import count_tokens

FIXTURES = Path(__file__).parent / "fixtures"
TEXTBOOK = (FIXTURES / "textbook_sample.md").read_text(encoding="utf-8")
MMLU = FIXTURES / "benchmarks" / "mmlu_mini.jsonl"
GSM8K = FIXTURES / "benchmarks" / "gsm8k_mini.csv"
LABELLED = FIXTURES / "quality_labelled.jsonl"


def document(id: str, text: str, **fields: Any) -> Document:
    """A Document with neutral provenance; `fields` override any column."""
    values: dict[str, Any] = {
        "id": id, "text_sha256": sha256_hex(text), "text": text, "topic": "t",
        "topic_path": ["t"], "audience": "a", "style": "s", "format": "f", "seed_words": [],
        "prompt": "p", "model": "m", "backend": "b", "sampling": "{}", "seed": 0,
        "sample_index": 0, "finish_reason": "stop", "truncated": False, "n_tokens": 1,
        "run_id": "r", "created_at": datetime.now(UTC),
    }  # fmt: skip
    return Document(**{**values, **fields})


def make_doc(text: str, id: str = "doc", finish_reason: str | None = "stop") -> Document:
    """A textbook-looking document, its tokens counted for real (the length rules use them)."""
    return document(
        id,
        text,
        topic="photosynthesis",
        topic_path=["biology", "photosynthesis"],
        audience="students",
        style="textbook",
        format="chapter",
        prompt="Write a chapter.",
        model="test",
        backend="test",
        finish_reason=finish_reason,
        truncated=finish_reason == "length",
        n_tokens=count_tokens([text])[0] if text else 0,
        run_id="run",
    )
