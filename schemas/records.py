"""Records exchanged between stages: seeds -> requests -> results -> documents.

Each is a pydantic model; the Arrow schema of the Parquet files that hold them is derived
from the model by `schemas.arrow.arrow_schema`, so a column is declared exactly once.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

# Bumped whenever a column is added, removed or changes meaning; written into every manifest.
# 2: the grounded-generation provenance columns (GROUNDING_COLUMNS), null for topic requests.
SCHEMA_VERSION = 2


_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def canonical_json(value: Any) -> str:
    """Stable JSON for hashing: sorted keys, no whitespace, UTF-8 kept as is. (One encoder for
    every call: json.dumps with options builds a new one each time, 2 us of a plan request.)"""
    return _CANONICAL.encode(value)


def sha256_hex(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class TopicSeed(BaseModel):
    """One topic to write about, as read from a seed file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    topic: str = Field(min_length=1)
    subject: str | None = None
    path: list[str] = Field(default_factory=list)  # ancestors, root first, topic excluded
    weight: float = Field(default=1.0, gt=0)

    @property
    def topic_path(self) -> list[str]:
        return [*self.path, self.topic]


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    role: Literal["system", "user", "assistant"]
    content: str


class Sampling(BaseModel):
    """Sampling parameters sent with a request. `seed` is derived per sample (see build)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_tokens: int = Field(default=600, gt=0)
    temperature: float = Field(default=0.8, ge=0, le=2)
    top_p: float = Field(default=0.95, gt=0, le=1)
    seed: int | None = None
    # OpenAI's penalties on tokens already generated (small models loop without them).
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)

    def key_fields(self) -> dict[str, Any]:
        """What enters the request key: penalties only when set, so requests that do not use
        them keep the ids they had before penalties existed."""
        data = self.model_dump()
        for name in ("frequency_penalty", "presence_penalty"):
            if data[name] is None:
                del data[name]
        return data


# The grounding columns are declared once, here. GenerationRequest and Document inherit them
# as their last columns: each lists Grounding before a base that holds its own columns
# (_RequestColumns, _DocumentColumns), and pydantic orders fields from the last class of the
# MRO to the first, so their own come first, then these, as in the shards written so far.
class Grounding(BaseModel):
    """Where a grounded request's passage came from and how it was rewritten: columns of the
    plan, text and rejected shards (all null for a request written from a topic)."""

    source_id: str | None = None  # the input record's `id`, verbatim (as text)
    source_passage: int | None = None  # the passage's index within its record
    source_start: int | None = None  # its character span in the record's text
    source_end: int | None = None
    source_name: str | None = None
    source_checksum: str | None = None  # sha256 over the source's records (id and text)
    license: str | None = None  # the record's own licence, else the source's
    recipe: str | None = None  # prompts/recipes.yaml
    template_version: str | None = None  # sha256 of the recipe's template text, first 12


# The columns schema version 2 added: a version written before has none of them.
GROUNDING_COLUMNS = tuple(Grounding.model_fields)


class _RequestColumns(BaseModel):
    """GenerationRequest's columns before the grounding ones."""

    id: str
    model: str
    messages: list[Message]
    sampling: Sampling
    sample_index: int = 0
    topic: str = ""
    topic_path: list[str] = Field(default_factory=list)
    subject: str | None = None
    audience: str = ""
    style: str = ""
    format: str = ""
    seed_words: list[str] = Field(default_factory=list)
    template: str = ""
    response_format: str | None = None  # JSON of OpenAI's response_format (structured output)


# its columns: _RequestColumns', then the grounding ones, null for topic requests
class GenerationRequest(Grounding, _RequestColumns):
    """One chat completion to make. `id` is the hash of its request key (model, messages,
    sampling, sample index): the same plan yields the same ids and the same cache keys."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    @staticmethod
    def key_payload(
        model: str,
        messages: list[Message],
        sampling: Sampling,
        sample_index: int,
        response_format: str | None = None,
    ) -> dict[str, Any]:
        payload = {
            "model": model,
            "messages": [m.model_dump() for m in messages],
            "sampling": sampling.key_fields(),
            "sample_index": sample_index,
        }
        if response_format is not None:  # only when set, so plain requests keep their ids
            payload["response_format"] = response_format
        return payload

    @classmethod
    def build(
        cls,
        *,
        messages: list[Message] | list[dict[str, str]],
        model: str,
        sampling: Sampling,
        sample_index: int = 0,
        **metadata: Any,
    ) -> GenerationRequest:
        """Make a request whose id and sampling seed follow from its content.

        Different sample indexes of one prompt get different seeds, so n samples stay distinct;
        an explicit `sampling.seed` is kept (it is part of the key)."""
        msgs = [m if isinstance(m, Message) else Message(**m) for m in messages]
        fmt = metadata.get("response_format")
        if sampling.seed is None:
            unseeded = canonical_json(cls.key_payload(model, msgs, sampling, sample_index, fmt))
            sampling = sampling.model_copy(update={"seed": int(sha256_hex(unseeded)[:8], 16)})
        key = canonical_json(cls.key_payload(model, msgs, sampling, sample_index, fmt))
        return cls(
            id=sha256_hex(key)[:32],
            model=model,
            messages=msgs,
            sampling=sampling,
            sample_index=sample_index,
            **metadata,
        )

    @property
    def prompt(self) -> str:
        """The user-visible prompt (last user message), stored with the document."""
        users = [m.content for m in self.messages if m.role == "user"]
        return users[-1] if users else ""


class RequestBuilder:
    """`GenerationRequest.build` for the many requests of a plan, which share the model, the
    sampling and the system prompt and differ in the user prompt and the sample index: the
    request key is hashed from pre-serialised parts around the values that vary, the same text
    canonical_json writes (tested), so a million requests are not spent encoding JSON."""

    def __init__(self, *, model: str, sampling: Sampling, system_prompt: str | None = None):
        self.model = model
        self.system = [Message(role="system", content=system_prompt)] if system_prompt else []
        self.sampling = sampling.model_dump()
        self.fixed_seed = sampling.seed
        marker = "\x00" + secrets.token_hex(8)
        slots = {name: f"{marker}:{name}" for name in ("prompt", "index", "seed")}
        user = Message(role="user", content=slots["prompt"])
        payload = GenerationRequest.key_payload(model, [*self.system, user], sampling, 0)
        payload["sample_index"] = slots["index"]
        payload["sampling"]["seed"] = slots["seed"]
        key = canonical_json(payload)
        self._head, tail = key.split(canonical_json(slots["prompt"])[1:-1])
        tail = tail.replace("{", "{{").replace("}", "}}")
        for name in ("index", "seed"):  # numbers: the quotes around the slot go too
            tail = tail.replace(canonical_json(slots[name]), f"{{{name}}}")
        self._tail = tail

    def build(self, prompt: str, sample_index: int = 0, **metadata: Any) -> GenerationRequest:
        """The request `GenerationRequest.build` makes for this user prompt."""
        if "response_format" in metadata:  # it would have to enter the key
            raise TypeError("RequestBuilder does not take response_format; use build()")
        # The key up to the end of the prompt is hashed once for both the seed and the id.
        head = hashlib.sha256((self._head + canonical_json(prompt)[1:-1]).encode())
        seed = self.fixed_seed
        if seed is None:
            unseeded = head.copy()
            unseeded.update(self._tail.format(index=sample_index, seed="null").encode())
            seed = int(unseeded.hexdigest()[:8], 16)
        key = head.copy()
        key.update(self._tail.format(index=sample_index, seed=seed).encode())
        # One dict validated in one pass: cheaper than building the Message and Sampling first.
        return GenerationRequest.model_validate(
            {
                "id": key.hexdigest()[:32],
                "model": self.model,
                "messages": [*self.system, {"role": "user", "content": prompt}],
                "sampling": {**self.sampling, "seed": seed},
                "sample_index": sample_index,
                **metadata,
            }
        )


FinishReason = Literal["stop", "length", "content_filter", "tool_calls", "function_call", "error"]


class GenerationResult(BaseModel):
    """What came back for one request: a completion, or a recorded failure."""

    model_config = ConfigDict(extra="forbid")

    request_id: str
    text: str = ""
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    model: str = ""  # as reported by the endpoint
    backend: str = ""
    attempts: int = 1
    latency_s: float = 0.0
    error: str | None = None  # failure reason; None for a completion
    created_at: datetime = Field(default_factory=lambda: datetime.now(UTC))

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def truncated(self) -> bool:
        return self.finish_reason == "length"

    @property
    def empty(self) -> bool:
        return self.ok and not self.text.strip()


class _DocumentColumns(BaseModel):
    """Document's columns before the grounding ones."""

    id: str
    text_sha256: str
    text: str
    topic: str
    topic_path: list[str]
    subject: str | None = None
    audience: str
    style: str
    format: str
    seed_words: list[str]
    prompt: str
    model: str
    backend: str
    sampling: str  # JSON of the sampling parameters
    seed: int
    sample_index: int
    finish_reason: str | None
    truncated: bool
    n_tokens: int
    lang: str | None = None
    lang_score: float | None = None
    quality_score: float | None = None
    run_id: str
    created_at: datetime


# its columns: _DocumentColumns', then the grounding ones, null for topic requests
class Document(Grounding, _DocumentColumns):
    """One generated text with its provenance: a row of the text shards."""

    model_config = ConfigDict(extra="forbid")

    @classmethod
    def from_generation(
        cls, request: GenerationRequest, result: GenerationResult, *, run_id: str, n_tokens: int
    ) -> Document:
        return cls(
            id=request.id,
            text_sha256=sha256_hex(result.text),
            text=result.text,
            topic=request.topic,
            topic_path=request.topic_path,
            subject=request.subject,
            audience=request.audience,
            style=request.style,
            format=request.format,
            seed_words=request.seed_words,
            prompt=request.prompt,
            model=result.model or request.model,
            backend=result.backend,
            sampling=canonical_json(request.sampling.model_dump()),
            seed=request.sampling.seed or 0,
            sample_index=request.sample_index,
            finish_reason=result.finish_reason,
            truncated=result.truncated,
            n_tokens=n_tokens,
            run_id=run_id,
            created_at=result.created_at,
            **{name: getattr(request, name) for name in GROUNDING_COLUMNS},
        )


class Rejected(Document):
    """A document a stage dropped, with why (`<family>:<rule>`) and, for duplicates, of what."""

    reason: str
    duplicate_of: str | None = None
    detail: str | None = None  # JSON: the figures that decided it (score, threshold, span)
