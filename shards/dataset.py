"""Write one dataset version: shards first, the manifest last.

Layout (see DESIGN.md): text/ and rejected/ shards, plan.parquet, failures.parquet, and
manifest.json with every file's rows, bytes and sha256, counts per stage and reason.
"""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from datetime import UTC, datetime
from functools import cache
from importlib import metadata
from pathlib import Path
from typing import Any

from schemas import SCHEMA_VERSION, Document, GenerationRequest, GenerationResult, Rejected
from schemas.arrow import to_table
from shards.version import MANIFEST
from shards.writer import ShardInfo, atomic_write_table, write_json_atomic, write_shards


@cache
def code_version() -> str:
    """Package version, plus the git commit when running from a checkout."""
    try:
        version = metadata.version("booksmith")
    except metadata.PackageNotFoundError:
        version = "0+unknown"
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return f"{version}+g{sha}" if sha else version


def write_version(
    root: Path,
    *,
    run_id: str,
    plan: Sequence[GenerationRequest],
    kept: Sequence[Document],
    rejected: Sequence[Rejected],
    failures: Sequence[GenerationResult],
    shard_rows: int,
    encoding: str,
    config: dict[str, Any],
    config_hash: str,
    counts: dict[str, Any],
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write every file of the version, then its manifest; returns the manifest."""
    root.mkdir(parents=True, exist_ok=True)
    shards: list[ShardInfo] = []
    shards += write_shards(
        kept, Document, root=root, subdir="text", kind="text", shard_rows=shard_rows
    )
    shards += write_shards(
        rejected, Rejected, root=root, subdir="rejected", kind="rejected", shard_rows=shard_rows
    )
    shards.append(
        atomic_write_table(
            to_table(plan, GenerationRequest), root / "plan.parquet", root=root, kind="plan"
        )
    )
    shards.append(
        atomic_write_table(
            to_table(failures, GenerationResult),
            root / "failures.parquet",
            root=root,
            kind="failures",
        )
    )
    manifest: dict[str, Any] = {
        "run_id": run_id,
        "created_at": datetime.now(UTC).isoformat(),
        "schema_version": SCHEMA_VERSION,
        "code_version": code_version(),
        "config_hash": config_hash,
        "config": config,
        "counts": counts,
        "documents": len(kept),
        "tokens": {encoding: {"documents": len(kept), "tokens": sum(d.n_tokens for d in kept)}},
        "primary_encoding": encoding,
        "diversity": {},
        "shards": [s.to_json() for s in shards],
        **(extra or {}),
    }
    write_json_atomic(root / MANIFEST, manifest)  # last: only now is the directory a dataset
    return manifest
