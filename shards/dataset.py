"""Write one dataset version: shards first, then the card, the manifest last.

Layout (see DESIGN.md): text/, tokens/<encoding>/ (and packed rows if asked), rejected/,
plan.parquet, failures.parquet, README.md (the dataset card), and manifest.json with every
file's rows, bytes and sha256, tokens per encoding, counts per stage and reason.
"""

from __future__ import annotations

import shutil
import subprocess
from collections import Counter
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from functools import cache
from importlib import metadata
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from schemas import SCHEMA_VERSION, Document, GenerationRequest, GenerationResult, Rejected
from schemas.arrow import to_table
from schemas.crashpoints import crash_point
from shards.card import render_card
from shards.encodings import EncodingSpec
from shards.tokens import write_token_shards
from shards.version import MANIFEST, read_manifest
from shards.writer import (
    DEFAULT_SHARD_BYTES,
    ShardInfo,
    atomic_write_bytes,
    atomic_write_table,
    write_json_atomic,
    write_shards,
)

CARD = "README.md"


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


SHARD_DIRS = ("text", "tokens", "rejected")


def clear_leftovers(root: Path) -> None:
    """Remove the shards and temporary files of an attempt that died before its manifest."""
    for name in SHARD_DIRS:
        if (root / name).is_dir():
            shutil.rmtree(root / name)
    for tmp in root.glob(".*.tmp-*") if root.is_dir() else []:
        tmp.unlink()


def commit_manifest(root: Path, manifest: dict[str, Any]) -> None:
    """Write the card, then the manifest: only once the manifest is renamed into place is the
    directory a (new) dataset version."""
    atomic_write_bytes(root / CARD, render_card(manifest).encode("utf-8"))
    write_json_atomic(root / MANIFEST, manifest)


def write_version(
    root: Path,
    *,
    run_id: str,
    plan: Sequence[GenerationRequest],
    kept: Sequence[Document],
    rejected: Sequence[Rejected],
    failures: Sequence[GenerationResult],
    shard_rows: int | None,
    encoding: str,
    config: dict[str, Any],
    config_hash: str,
    counts: dict[str, Any],
    extra: dict[str, Any] | None = None,
    shard_bytes: int | None = DEFAULT_SHARD_BYTES,
    encodings: Sequence[EncodingSpec | str] = (),
    pack_seq_len: int | None = None,
    num_threads: int | None = None,
    card: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write every file of the version, then its card and manifest; returns the manifest.

    Token shards are written for `encoding` (the primary one, that `n_tokens` counts in) and
    for each of `encodings`; `pack_seq_len` adds packed rows of that length + 1 for each.
    `card` holds the dataset card's `license`, `language` and `pretty_name`.
    A directory that already is a version is never overwritten; leftovers of an attempt that
    died before its manifest are cleared first (readers that glob must not see them)."""
    if (root / MANIFEST).exists():
        raise FileExistsError(f"{root}: already a dataset version (it has {MANIFEST})")
    clear_leftovers(root)
    root.mkdir(parents=True, exist_ok=True)
    shards: list[ShardInfo] = []
    shards += write_shards(
        kept,
        Document,
        root=root,
        subdir="text",
        kind="text",
        shard_rows=shard_rows,
        shard_bytes=shard_bytes,
    )
    tokens: dict[str, Any] = {}
    specs = [EncodingSpec(encoding), *(EncodingSpec.of(e) for e in encodings)]
    for spec in {s.name: s for s in specs}.values():
        enc = spec.load()
        result = write_token_shards(
            ((d.id, d.text) for d in kept),
            enc,
            root=root,
            shard_rows=shard_rows,
            shard_bytes=shard_bytes,
            num_threads=num_threads,
            pack_seq_len=pack_seq_len,
        )
        shards += result.shards + result.packed_shards
        tokens[enc.name] = result.manifest_entry(enc)
    shards += write_shards(
        rejected,
        Rejected,
        root=root,
        subdir="rejected",
        kind="rejected",
        shard_rows=shard_rows,
        shard_bytes=shard_bytes,
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
        "primary_encoding": encoding,
        "tokens": tokens,
        "languages": dict(Counter(d.lang for d in kept if d.lang)),
        "diversity": {},
        "card": card or {},
        "shards": [s.to_json() for s in shards],
        **(extra or {}),
    }
    crash_point("shards.manifest")
    commit_manifest(root, manifest)  # last: only now is the directory a dataset
    return manifest


def shard_paths(manifest: dict[str, Any], kind: str, encoding: str | None = None) -> list[str]:
    return [
        s["path"]
        for s in manifest["shards"]
        if s["kind"] == kind and (encoding is None or s.get("encoding") == encoding)
    ]


def iter_texts(root: Path, manifest: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(id, text) of every kept document, streamed from the text shards in order."""
    for path in shard_paths(manifest, "text"):
        for batch in pq.ParquetFile(root / path).iter_batches(columns=["id", "text"]):
            yield from zip(batch.column(0).to_pylist(), batch.column(1).to_pylist(), strict=True)


def add_encoding(
    root: Path,
    spec: EncodingSpec | str,
    *,
    shard_rows: int | None = None,
    shard_bytes: int | None = DEFAULT_SHARD_BYTES,
    pack_seq_len: int | None = None,
    num_threads: int | None = None,
) -> dict[str, Any]:
    """Tokenize an existing version's text shards with one more encoding (a version may carry
    several); rewrites the card and then the manifest. A crash before the manifest leaves the
    old manifest, which does not list the new files."""
    spec = EncodingSpec.of(spec)
    manifest = read_manifest(root)
    enc = spec.load()
    if enc.name in manifest.get("tokens", {}):
        raise ValueError(f"{root / MANIFEST}: tokens: {enc.name!r} is already in this version")
    stale = root / "tokens" / enc.name
    for leftover in stale.glob("*.parquet") if stale.is_dir() else []:
        leftover.unlink()  # from a crashed earlier attempt: never in a manifest
    result = write_token_shards(
        iter_texts(root, manifest),
        enc,
        root=root,
        shard_rows=shard_rows,
        shard_bytes=shard_bytes,
        num_threads=num_threads,
        pack_seq_len=pack_seq_len,
    )
    manifest["tokens"][enc.name] = result.manifest_entry(enc)
    manifest["shards"] += [s.to_json() for s in result.shards + result.packed_shards]
    commit_manifest(root, manifest)
    return manifest
