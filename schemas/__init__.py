"""The records that cross a stage boundary, and their Arrow schemas (one source of truth)."""

from schemas.arrow import arrow_schema
from schemas.records import (
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
