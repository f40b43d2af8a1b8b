"""Dedup configuration: the `dedup:` section the run config embeds (RunConfig.dedup), and the
MinHash parameters it fixes (filters/dedup/minhash.py computes with them)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


@dataclass(frozen=True)
class MinHashParams:
    num_perm: int = 112
    bands: int = 14
    rows: int = 8
    ngram: int = 5
    seed: int = 1

    def __post_init__(self) -> None:
        if self.bands * self.rows > self.num_perm:
            raise ValueError(
                f"bands x rows ({self.bands} x {self.rows}) exceeds num_perm ({self.num_perm})"
            )
        if min(self.num_perm, self.bands, self.rows, self.ngram) < 1:
            raise ValueError("num_perm, bands, rows and ngram must be positive")

    @property
    def band_threshold(self) -> float:
        """Jaccard at which banding flags a pair half the time: (1/bands)^(1/rows)."""
        return float((1.0 / self.bands) ** (1.0 / self.rows))


class DedupSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    exact: bool = True  # drop exact duplicates of normalised text (`dedup_exact`)
    minhash: bool = True  # drop near-duplicates (`dedup_minhash`)
    num_perm: int = Field(default=112, ge=2, le=1024)
    bands: int = Field(default=14, ge=2)
    rows: int = Field(default=8, ge=1)
    ngram: int = Field(default=5, ge=1, le=32)  # words per shingle
    seed: int = Field(default=1, ge=0)  # permutation seed (datasketch's default)
    # Estimated Jaccard a band candidate must reach to count as a duplicate;
    # None: the band threshold (1/bands)^(1/rows), about 0.72 at 14 x 8.
    threshold: float | None = Field(default=None, gt=0, le=1)
    # Where earlier runs' documents live: a directory ("file"), Redis, or nowhere ("none").
    index: Literal["file", "redis", "none"] = "file"
    index_path: Path | None = None  # "file": default <output.dir>/_state/minhash
    # "redis": e.g. redis://10.0.0.5:6379/0; default from BOOKSMITH_REDIS_URL (the compose
    # worker sets it), so one config serves every worker of a deployment.
    redis_url: str | None = Field(default_factory=lambda: os.environ.get("BOOKSMITH_REDIS_URL"))
    redis_basename: str = Field(default="booksmith", min_length=1)  # one per corpus

    @model_validator(mode="after")
    def _check(self) -> DedupSettings:
        if self.bands * self.rows > self.num_perm:
            raise ValueError(
                f"bands x rows ({self.bands} x {self.rows}) must not exceed num_perm "
                f"({self.num_perm})"
            )
        if self.index == "redis" and not self.redis_url:
            raise ValueError("index 'redis' needs redis_url (e.g. redis://127.0.0.1:6379/0)")
        return self

    @property
    def params(self) -> MinHashParams:
        return MinHashParams(
            num_perm=self.num_perm,
            bands=self.bands,
            rows=self.rows,
            ngram=self.ngram,
            seed=self.seed,
        )

    @property
    def jaccard_threshold(self) -> float:
        return self.threshold if self.threshold is not None else self.params.band_threshold
