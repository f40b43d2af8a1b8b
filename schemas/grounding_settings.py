"""Grounded generation's settings: the sources a run reads (`sources:`) and how their passages
become requests (`grounding:`: the token window, the routing table by quality score, the share
of topic requests in a mixed plan, whether a passage may be planned again)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SourceSpec(_Strict):
    """One source of `{id, text, license?, ...}` records: a JSONL or Parquet file, a folder of
    them, or a booksmith dataset version; a local path or a URL (s3://...)."""

    path: str = Field(min_length=1)
    name: str | None = None  # None: the file or folder's name (what provenance records)
    share: float = Field(default=1.0, gt=0)  # of the plan, against the other sources and topics
    license: str | None = None  # for records without a `license` field


class Route(_Strict):
    """Passages whose quality score is in [min_score, max_score) go to these recipes (the last
    band also takes max_score itself)."""

    min_score: float = Field(ge=0, le=1)
    max_score: float = Field(ge=0, le=1)
    recipes: list[str] = Field(min_length=1)

    @model_validator(mode="after")
    def _ordered(self) -> Route:
        if self.min_score >= self.max_score:
            raise ValueError(f"min_score {self.min_score} must be below max_score {self.max_score}")
        return self


def _nemotron_routes() -> list[Route]:
    """Nemotron-CC's routing: low-quality text is rephrased Wikipedia-style (WRAP), medium text
    becomes a textbook unit or QA rephrasing, high-quality text the four diverse recipes."""
    return [
        Route(min_score=0.0, max_score=0.45, recipes=["wikipedia_rephrase"]),
        Route(min_score=0.45, max_score=0.7, recipes=["textbook_unit", "qa_rephrase"]),
        Route(
            min_score=0.7,
            max_score=1.0,
            recipes=["diverse_qa", "distill", "extract_knowledge", "knowledge_list"],
        ),
    ]


class GroundingSettings(_Strict):
    # Passages are cut on paragraph boundaries to at most `max_tokens` tokens (the output's
    # primary encoding); a record's last piece under `min_tokens` joins the one before it.
    min_tokens: int = Field(default=64, ge=1)
    max_tokens: int = Field(default=512, ge=8)
    routes: list[Route] = Field(default_factory=_nemotron_routes)
    recipes_per_passage: int = Field(default=1, ge=1)  # requests per passage, from its band
    # The share of topic requests when topics and sources are planned together (the sources
    # have their own `share`); a run with sources and no `topics:` plans sources only.
    topics_share: float = Field(default=1.0, gt=0)
    # Candidate passages considered per passage planned: the pre-generation filters reject some.
    oversample: float = Field(default=1.5, ge=1)
    # "new": a passage planned by an earlier published run is not planned again; "any": it may.
    repeat: Literal["new", "any"] = "new"

    @model_validator(mode="after")
    def _window(self) -> GroundingSettings:
        if self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens {self.min_tokens} exceeds max_tokens {self.max_tokens}")
        return self

    def recipes_for(self, score: float) -> list[str]:
        """The recipes of the band holding `score` (none when no band does)."""
        for i, route in enumerate(self.routes):
            last = i == len(self.routes) - 1
            if route.min_score <= score < route.max_score or (last and score == route.max_score):
                return route.recipes
        return []
