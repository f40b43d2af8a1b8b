"""The manifest of a dataset version (`<version>/manifest.json`), as one typed model.

The shard writer builds it; everything that reads a version (report, card, verify, export,
coverage, takedown, the CLI, the trainer's loader) reads it through `Manifest.read`, so no
reader guesses a key. Unknown keys are errors: a typo in a hand-edited manifest, or a file
written by a newer booksmith, is one line naming the file and the field, never a silent
default.

Versions: `manifest_version` 2 is this model. Version 1 (no `manifest_version` key: every
version written before the typed manifest) has the same keys; the ones its writers could leave
out (`counts.chunks`, `run_key`, `quality`, a token entry's `dtype`, ...) have defaults here, so
it reads as version 2 directly (tests/fixtures/manifest-v1.json is a real one). A change of
shape bumps MANIFEST_VERSION and adds a `_from_vN` step to `Manifest.parse`.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from booksmith.schemas.redact import redact_config

MANIFEST = "manifest.json"
MANIFEST_VERSION = 2

ShardKind = Literal["text", "rejected", "plan", "failures", "tokens", "packed"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ShardEntry(_Strict, frozen=True):
    """One file of the version, with what verify checks it against."""

    path: str  # relative to the version's root
    rows: int
    bytes: int
    sha256: str
    kind: ShardKind
    encoding: str | None = None  # token and packed shards: the encoding's name
    stored_tokens: int | None = None  # token shards: tokens stored, end-of-text included


class Packed(_Strict):
    """Fixed rows of seq_len + 1 tokens cut from the concatenated token stream."""

    seq_len: int
    rows: int
    dropped_tokens: int
    path: str


class EncodingEntry(_Strict):
    """One encoding's token shards: what a trainer needs to read them."""

    n_vocab: int
    eot_token: int  # the end-of-text id appended after every document
    path: str  # the folder of its token shards
    stored_tokens: int
    documents: int = 0
    tokens: int = 0  # text tokens, end-of-text not counted
    dtype: str | None = None  # numpy dtype of input_ids; None in hand-made v1 manifests
    packed: Packed | None = None


class FillRound(_Strict):
    planned: int
    kept_total: int


class FillAccount(_Strict):
    """How the fill loop ended: `stopped` names why (target_met, max_rounds, ...)."""

    stopped: str | None = None
    rounds: list[FillRound] = Field(default_factory=list)
    short: dict[str, int] = Field(default_factory=dict)  # topic -> documents still missing


class GenerateCounts(_Strict):
    planned: int = 0
    completed: int = 0
    cached: int = 0
    failed: int = 0
    skipped_budget: int = 0
    skipped_breaker: int = 0
    requests: int = 0
    retries: int = 0
    retry_reasons: dict[str, int] = Field(default_factory=dict)  # reason -> retries
    rate_limited: int = 0  # attempts answered 429
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    truncated: int = 0
    empty: int = 0
    failures: dict[str, int] = Field(default_factory=dict)  # reason -> requests
    budget_exhausted: bool = False
    breaker: str | None = None
    elapsed_s: float = 0.0
    # the effective rate over time: {t_s, interval_s, requests, rpm, rate_limited, limit_rpm,
    # concurrency} per point, a bounded series (generation/limits.py)
    rate: list[dict[str, Any]] = Field(default_factory=list)


class PlanCounts(_Strict):
    requests: int = 0
    topics: dict[str, Any] = Field(default_factory=dict)  # the topic rotation's own account
    # source name -> its account: path, checksum, share, scorer, records, passages, those
    # earlier runs planned, candidates, the pre-generation rejects by reason, planned passages,
    # requests, requests per recipe, passages per licence
    sources: dict[str, dict[str, Any]] = Field(default_factory=dict)


class ChunkCounts(_Strict):
    """A streaming run's chunks and where the time went (stages overlap: busy can exceed wall)."""

    count: int
    requests: int  # plan.chunk_requests
    resumed: int = 0  # chunks a resumed run did not process again
    busy_s: dict[str, float] = Field(default_factory=dict)
    wall_s: float = 0.0


class Counts(_Strict):
    plan: PlanCounts = Field(default_factory=PlanCounts)
    fill: FillAccount | None = None
    generate: GenerateCounts = Field(default_factory=GenerateCounts)
    # filter name -> {"input", "kept", and one count per rejection reason}
    filter: dict[str, dict[str, int]] = Field(default_factory=dict)
    kept: int = 0
    rejected: int = 0
    chunks: ChunkCounts | None = None
    # the faithfulness judge's work (pipeline/judge_stage.py), beside its verdicts in `filter`:
    # judged, unparsed, failed, requests, prompt_tokens, completion_tokens
    judge: dict[str, int] | None = None


class AxisCoverage(_Strict):
    counts: dict[str, int]
    covered: float


class DiversitySampleInfo(_Strict):
    documents: int
    method: str


class Diversity(_Strict):
    """Corpus diversity (generation/diversity.py); text metrics may come from a sample."""

    documents: int = 0
    distinct_1: float = 0.0
    distinct_2: float = 0.0
    distinct_3: float = 0.0
    top_opener_share: float = 0.0
    top_openers: list[tuple[str, int]] = Field(default_factory=list)
    compression_ratio: float = 0.0
    mean_pairwise_minhash: float = 0.0
    minhash_sample: int = 0
    axis_coverage: dict[str, AxisCoverage] = Field(default_factory=dict)
    sample: DiversitySampleInfo | None = None  # None: every document was measured


class QualityHistogram(_Strict):
    """Quality scores of kept and rejected documents in bins between `edges`."""

    edges: list[float]
    kept: list[int]
    rejected: list[int]


class Takedown(_Strict):
    removed: dict[str, int]  # shard kind -> rows removed
    ids: int  # ids asked for


class Manifest(_Strict):
    run_id: str
    shards: list[ShardEntry]
    tokens: dict[str, EncodingEntry] = Field(default_factory=dict)
    primary_encoding: str | None = None
    manifest_version: int = MANIFEST_VERSION
    schema_version: int = 1  # of the records (schemas/records.py)
    created_at: str = Field(default_factory=lambda: datetime.now(UTC).isoformat())
    code_version: str | None = None
    config_hash: str | None = None
    # the run's RunConfig, as written, credentials in its URLs redacted (schemas/redact.py)
    config: Annotated[dict[str, Any], AfterValidator(redact_config)] = Field(default_factory=dict)
    counts: Counts = Field(default_factory=Counts)
    documents: int = 0
    languages: dict[str, int] = Field(default_factory=dict)
    diversity: Diversity = Field(default_factory=Diversity)
    quality: QualityHistogram | None = None
    card: dict[str, Any] = Field(default_factory=dict)  # license, language, pretty_name
    seed: int | None = None
    run_key: str | None = None  # config + seed + topics: a rerun of a finished run is a no-op
    takedowns: list[Takedown] = Field(default_factory=list)

    # --- reading ---------------------------------------------------------------------------

    @classmethod
    def read(cls, version: Path) -> Manifest:
        """The manifest of a version directory; FileNotFoundError when it is not a dataset."""
        path = version / MANIFEST
        return cls.parse(path.read_bytes(), str(path))

    @classmethod
    def parse(cls, raw: bytes | str, where: str) -> Manifest:
        """`where` names the file in errors: `ManifestError: <where>: <field>: <problem>`."""
        try:
            data = json.loads(raw)
        except ValueError as e:
            raise ManifestError(f"{where}: not JSON ({e}); the version is damaged") from None
        if not isinstance(data, dict):
            raise ManifestError(f"{where}: not a JSON object; the version is damaged")
        version = data.setdefault("manifest_version", 1)
        if version == 1:
            data["manifest_version"] = MANIFEST_VERSION  # same keys (see the module docstring)
        elif not isinstance(version, int) or version > MANIFEST_VERSION:
            raise ManifestError(
                f"{where}: manifest_version {version!r} is newer than this booksmith reads "
                f"({MANIFEST_VERSION}); upgrade booksmith"
            )
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            err = e.errors()[0]
            field = ".".join(str(p) for p in err["loc"]) or "(top level)"
            raise ManifestError(f"{where}: {field}: {err['msg']}") from None

    # --- questions readers ask ---------------------------------------------------------------

    def shard_paths(self, kind: ShardKind, encoding: str | None = None) -> list[str]:
        return [
            s.path
            for s in self.shards
            if s.kind == kind and (encoding is None or s.encoding == encoding)
        ]

    def encoding(self, name: str | None = None) -> tuple[str, EncodingEntry]:
        """(name, entry) of an encoding: `name`, else the primary one, else the only one."""
        if name is None:
            name = self.primary_encoding or (next(iter(self.tokens)) if self.tokens else None)
        if name is None or name not in self.tokens:
            have = ", ".join(self.tokens) or "none"
            raise ManifestError(f"{self.run_id}: no token shards for {name!r} (it has: {have})")
        return name, self.tokens[name]

    def to_json(self) -> str:
        return self.model_dump_json(indent=2, exclude_none=True) + "\n"


class ManifestError(ValueError):
    """A manifest that cannot be read; the message names the file and the field."""
