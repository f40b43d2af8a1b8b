"""Sources to ground generation in, read as a stream: a JSONL or Parquet file of `{id, text,
license?, title?, ...}`, a folder of them, or a booksmith dataset version (its text shards),
local or at a URL (s3://, through shards/fs.py). Records come a batch at a time, never the
whole source; the Parquet reader asks only for the columns it uses.

Bad input is one InputError naming the file and line (JSONL) or record (Parquet) and the fix.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from booksmith.filters.inputs import JSONL, PARQUET, InputError, check_row
from booksmith.schemas.grounding_settings import SourceSpec
from booksmith.schemas.jsonl import parse_lines
from booksmith.schemas.manifest import MANIFEST, Manifest, ManifestError
from booksmith.schemas.redact import redact_text
from booksmith.shards.fs import filesystem, join

BATCH_RECORDS = 1_000
COLUMNS = ("id", "text", "license", "title")  # what grounding reads of a record


@dataclass(frozen=True)
class SourceRecord:
    id: str  # the record's id as text (7 and "7" are one id, as for a Document)
    text: str
    license: str | None = None
    title: str | None = None


class Source:
    """One configured source: its files in a fixed order, and its records batch by batch."""

    def __init__(self, spec: SourceSpec) -> None:
        self.spec = spec
        self.location = redact_text(spec.path)  # what errors and the manifest show
        self.fs, self.root = filesystem(spec.path)
        self.name = spec.name or PurePosixPath(self.root).name or self.location

    def files(self) -> list[str]:
        """The data files, sorted (a dataset version: its text shards in manifest order)."""
        fs, root = self.fs, self.root
        if not fs.exists(root):
            raise InputError(f"{self.location}: source not found (sources[].path)")
        if not fs.isdir(root):
            return [root]
        manifest = join(root, MANIFEST)
        if fs.exists(manifest):
            try:
                parsed = Manifest.parse(fs.cat_file(manifest), f"{self.location}/{MANIFEST}")
            except ManifestError as e:
                raise InputError(str(e)) from None
            return [join(root, rel) for rel in parsed.shard_paths("text")]
        found = sorted(  # (not under a folder named _..., as _state/ is)
            p for p in fs.find(root)
            if p.lower().endswith(JSONL + PARQUET) and "/_" not in p[len(root):]
        )  # fmt: skip
        if not found:
            raise InputError(
                f"{self.location}: no .jsonl or .parquet file in this folder, and no "
                f"{MANIFEST} (sources[].path: a file, a folder of them or a dataset version)"
            )
        return found

    def fingerprint(self) -> str:
        """What the source holds, named without reading it (the run key: a source edited in
        place is another run). A dataset version: the digest of its manifest, which lists every
        shard's sha256. Files: each one's path with its size and modification time in ns
        (local), or its ETag and size (an object store: the ETag changes with the content)."""
        manifest = join(self.root, MANIFEST)
        if self.fs.isdir(self.root) and self.fs.exists(manifest):
            return "manifest:" + hashlib.sha256(self.fs.cat_file(manifest)).hexdigest()
        h = hashlib.sha256()
        for path in self.files():
            h.update(json.dumps([path, *_identity(self.fs, path)]).encode("utf-8") + b"\n")
        return "files:" + h.hexdigest()

    def batches(self, size: int | None = None) -> Iterator[list[SourceRecord]]:
        size = size or BATCH_RECORDS
        for path in self.files():
            lower = path.lower()
            if lower.endswith(JSONL):
                yield from _jsonl(self.fs, path, size)
            elif lower.endswith(PARQUET):
                yield from _parquet(self.fs, path, size)
            else:
                raise InputError(f"{path}: expected a .jsonl or .parquet file (sources[].path)")


def _identity(fs: fsspec.AbstractFileSystem, path: str) -> list[Any]:
    if isinstance(fs, LocalFileSystem):
        st = os.stat(path)  # fsspec's local mtime is a float of seconds; ns tells more edits apart
        return [st.st_size, st.st_mtime_ns]
    info = fs.info(path)
    # S3's ETag (and VersionId where versioning is on); other stores' modification time
    tag = info.get("ETag") or info.get("etag") or info.get("LastModified") or info.get("mtime")
    return [info.get("size"), str(tag), str(info.get("VersionId") or "")]


def _record(row: dict[str, Any], where: str) -> SourceRecord:
    check_row(where, row, ("id", "text"))
    text, lic, title = row.get("text") or "", row.get("license"), row.get("title")
    return SourceRecord(
        str(row["id"]),
        text,
        None if lic is None else str(lic),
        None if title is None else str(title),
    )


def _jsonl(fs: fsspec.AbstractFileSystem, path: str, size: int) -> Iterator[list[SourceRecord]]:
    batch: list[SourceRecord] = []
    try:
        with fs.open(path, "rb") as raw, io.TextIOWrapper(raw, encoding="utf-8") as f:
            for lineno, row in parse_lines(f, path, InputError):
                batch.append(_record(row, f"{path}:{lineno}"))
                if len(batch) == size:
                    yield batch
                    batch = []
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    if batch:
        yield batch


def _parquet(fs: fsspec.AbstractFileSystem, path: str, size: int) -> Iterator[list[SourceRecord]]:
    row = 0
    try:
        with fs.open(path, "rb") as f:
            parquet = pq.ParquetFile(f)
            names = parquet.schema_arrow.names
            for needed in ("id", "text"):
                if needed not in names:
                    raise InputError(
                        f"{path}: no `{needed}` column (source records need `id` and `text`)"
                    )
            columns = [c for c in COLUMNS if c in names]
            for batch in parquet.iter_batches(size, columns=columns):
                rows = batch.to_pylist()
                yield [_record(r, f"{path}: record {row + k + 1}") for k, r in enumerate(rows)]
                row += len(rows)
    except (OSError, pa.ArrowException) as e:
        raise InputError(f"{path}: unreadable Parquet ({e})") from None


class Checksum:
    """sha256 over a source's records (id and text, in order): what the source held when a run
    read it, whatever its format or files."""

    def __init__(self) -> None:
        self._h = hashlib.sha256()

    def update(self, record: SourceRecord) -> None:
        self._h.update(record.id.encode("utf-8") + b"\0" + record.text.encode("utf-8") + b"\0")

    def hexdigest(self) -> str:
        return self._h.hexdigest()
