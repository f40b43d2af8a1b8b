"""Chunk checkpoints: a run killed at any point resumes at its last completed chunk.

After each chunk's spill, `checkpoint.json` in the run's work directory records what a restart
needs to carry on as if nothing had happened: how many chunks are done, how many rows the
append-only files (candidate store, exact-dedup map) held then, the counters, and each fill
round's decision (so the same rounds are planned again without recomputing them from a later
state). It is written atomically after the chunk's files, so it never names a chunk whose
spill is missing; rows appended after it (a chunk cut short) are truncated away on resume.

`run_key` names what makes two runs the same run: the config's hash, the seed, the seed
topics and, for a grounded run, what each source holds (Source.fingerprint: a file edited in
place is another run). A run with the same key resumes an unfinished directory of that key,
and is a no-op when a version with that key is already complete.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from booksmith.filters.sources import Source
from booksmith.schemas import TopicSeed
from booksmith.schemas.config import RunConfig
from booksmith.schemas.crashpoints import crash_point
from booksmith.shards.files import write_bytes_atomically

CHECKPOINT = "checkpoint.json"
FORMAT = 1


def run_key(cfg: RunConfig, seed: int, seeds: list[TopicSeed]) -> str:
    topics = hashlib.sha256()
    for t in seeds:
        topics.update(t.model_dump_json().encode("utf-8"))
        topics.update(b"\n")
    material = f"{cfg.config_hash()}:{seed}:{topics.hexdigest()}"
    if cfg.sources:  # (a run without sources keeps the key it had before they existed)
        material += ":" + ":".join(Source(spec).fingerprint() for spec in cfg.sources)
    return hashlib.sha256(material.encode()).hexdigest()[:24]


@dataclass
class Checkpoint:
    run_key: str
    chunk_requests: int
    chunks: int = 0
    store_rows: int = 0
    exact_rows: int = 0
    generation: dict[str, Any] = field(default_factory=dict)
    exact_counts: dict[str, int] = field(default_factory=dict)
    near_counts: dict[str, int] = field(default_factory=dict)
    quality_counts: dict[str, dict[str, int]] = field(default_factory=dict)
    busy_s: dict[str, float] = field(default_factory=dict)
    topics: list[str] = field(default_factory=list)
    decisions: list[dict[str, Any]] = field(default_factory=list)
    format: int = FORMAT

    def save(self, work: Path) -> None:
        body = json.dumps(asdict(self), sort_keys=True).encode("utf-8")
        write_bytes_atomically(work / CHECKPOINT, body)
        crash_point("chunk.done")

    @classmethod
    def load(cls, work: Path) -> Checkpoint | None:
        """The checkpoint in `work`, or None if there is none or it cannot be used."""
        try:
            data = json.loads((work / CHECKPOINT).read_text(encoding="utf-8"))
            if data.get("format") != FORMAT:
                return None
            return cls(**data)
        except (OSError, ValueError, TypeError):
            return None
