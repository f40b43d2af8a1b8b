"""The records that cross a stage boundary, and their Arrow schemas (one source of truth)."""

from booksmith.schemas.arrow import arrow_schema
from booksmith.schemas.records import (
    SCHEMA_VERSION,
    Document,
    GenerationRequest,
    GenerationResult,
    Message,
    Rejected,
    RequestBuilder,
    Sampling,
    TopicSeed,
)

__all__ = [
    "SCHEMA_VERSION",
    "Document",
    "GenerationRequest",
    "GenerationResult",
    "Message",
    "Rejected",
    "RequestBuilder",
    "Sampling",
    "TopicSeed",
    "arrow_schema",
]
