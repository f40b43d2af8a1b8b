"""Source passages checked before any request is planned for them: language id, the Gopher
and C4/FineWeb heuristics and benchmark decontamination, the same filters and thresholds
generated text passes (`filters:`), so a passage that holds a benchmark item, or is not text
worth grounding in, is never sent to the model. Generation-artifact rules do not apply to
human text, and the quality classifier scores here instead of dropping: its score routes the
passage to recipes (grounding.routes), the heuristic score where no classifier is trained.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from booksmith.filters.base import run_chain
from booksmith.filters.chain import build_chain
from booksmith.filters.heuristic_score import heuristic_score
from booksmith.filters.quality import QualityFilter, QualityModel
from booksmith.schemas import Document
from booksmith.schemas.filter_settings import FilterSettings
from booksmith.schemas.records import sha256_hex


@dataclass
class GateResult:
    kept: list[int]  # indexes into the texts given, in order
    scores: list[float]  # the quality score of each kept one
    rejected: Counter[str] = field(default_factory=Counter)  # reason -> passages


class SourceGate:
    """Built once per run (language id and the benchmark index load once)."""

    def __init__(self, settings: FilterSettings, state: Path | None = None) -> None:
        gate = settings.model_copy(
            update={"artifacts": settings.artifacts.model_copy(update={"enabled": False})}
        )
        chain = build_chain(gate, state=state)
        self.model: QualityModel | None = None
        for f in chain:
            if isinstance(f, QualityFilter):
                self.model = f.model
        self.chain = [f for f in chain if not isinstance(f, QualityFilter)]
        self.lines = settings.lines
        self.scorer = "classifier" if self.model is not None else "heuristic"

    def run(self, texts: Sequence[str]) -> GateResult:
        now = datetime.now(UTC)
        docs = [_document(str(i), t, now) for i, t in enumerate(texts)]
        result = run_chain(docs, self.chain)
        kept = [int(d.id) for d in result.kept]
        survivors = [texts[i] for i in kept]
        if self.model is not None:
            scores = self.model.score(survivors)
        else:
            scores = [heuristic_score(t, self.lines) for t in survivors]
        return GateResult(kept, scores, Counter(r.reason for r in result.rejected))


def _document(i: str, text: str, now: datetime) -> Document:
    """A passage as the filters take it (only its text matters to them)."""
    return Document(
        id=i, text_sha256=sha256_hex(text), text=text, topic="", topic_path=[], audience="",
        style="", format="", seed_words=[], prompt="", model="", backend="", sampling="{}",
        seed=0, sample_index=0, finish_reason="stop", truncated=False, n_tokens=0, run_id="",
        created_at=now,
    )  # fmt: skip
