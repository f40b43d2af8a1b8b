"""Check a dataset version where it lies (a directory or any URL fsspec reaches).

Every shard the manifest lists: present, its size, its sha256, a readable Parquet footer with
the rows the manifest says and the schema its kind must have. Then totals against the manifest,
every document present in each encoding's token shards, and a token round trip on a sample:
decode(input_ids) == text followed by the end-of-text token (less the bytes an encoding has
no token for: `encodings.decoded_bytes`).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

import fsspec
import pyarrow as pa
from pydantic import BaseModel

from booksmith.schemas import Document, GenerationRequest, GenerationResult, Rejected
from booksmith.schemas.arrow import versioned_schema
from booksmith.schemas.manifest import MANIFEST, Manifest, ManifestError, Packed, ShardEntry
from booksmith.shards.encodings import EncodingUnavailable, decoded_bytes, get_encoding
from booksmith.shards.files import file_sha256
from booksmith.shards.fs import filesystem, join, open_parquet
from booksmith.shards.tokens import packed_schema, token_schema

_RECORD_SCHEMAS: dict[str, type[BaseModel]] = {
    "text": Document,
    "rejected": Rejected,
    "plan": GenerationRequest,
    "failures": GenerationResult,
}


@dataclass
class VerifyReport:
    location: str
    problems: list[str] = field(default_factory=list)  # each names the file it is about
    notes: list[str] = field(default_factory=list)
    shards_checked: int = 0
    round_trips: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems


def _expected_schema(shard: ShardEntry, manifest: Manifest) -> pa.Schema | None:
    kind = shard.kind
    if kind in _RECORD_SCHEMAS:
        return versioned_schema(_RECORD_SCHEMAS[kind], manifest.schema_version)
    entry = manifest.tokens.get(shard.encoding or "")
    if entry is None:
        return None
    width = pa.uint16() if entry.dtype == "uint16" else pa.uint32()
    if kind == "tokens":
        return token_schema(width)
    if kind == "packed" and entry.packed is not None:
        return packed_schema(width, entry.packed.seq_len)
    return None


def _check_shard(
    fs: fsspec.AbstractFileSystem,
    root: str,
    shard: ShardEntry,
    manifest: Manifest,
    report: VerifyReport,
    checksums: bool,
) -> None:
    rel = shard.path
    path = join(root, rel)
    if not fs.exists(path):
        report.problems.append(f"{rel}: missing")
        return
    size = fs.size(path)
    if size != shard.bytes:
        report.problems.append(f"{rel}: {size} bytes, manifest says {shard.bytes} (truncated?)")
    if checksums and (actual := file_sha256(path, fs)) != shard.sha256:
        report.problems.append(f"{rel}: sha256 {actual} does not match the manifest")
    try:
        with open_parquet(fs, path) as meta:
            rows, schema = meta.metadata.num_rows, meta.schema_arrow
    except (OSError, pa.ArrowException) as e:
        report.problems.append(f"{rel}: not a readable Parquet file: {e}")
        return
    if rows != shard.rows:
        report.problems.append(f"{rel}: {rows} rows, manifest says {shard.rows}")
    expected = _expected_schema(shard, manifest)
    if expected is not None and not schema.equals(expected):
        report.problems.append(f"{rel}: schema differs from the {shard.kind} schema: {schema}")
    report.shards_checked += 1


def _read_columns(
    fs: fsspec.AbstractFileSystem, root: str, paths: list[str], columns: list[str]
) -> pa.Table:
    tables = []
    for rel in paths:
        with open_parquet(fs, join(root, rel)) as parquet:
            tables.append(parquet.read(columns=columns))
    return pa.concat_tables(tables) if tables else pa.table({c: [] for c in columns})


def _check_packed(
    fs: fsspec.AbstractFileSystem,
    root: str,
    manifest: Manifest,
    name: str,
    packed: Packed,
    tok_shards: list[ShardEntry],
    report: VerifyReport,
) -> None:
    """Packed rows: their count, and the first row against the start of the token stream."""
    paths = manifest.shard_paths("packed", name)
    rows = sum(s.rows for s in manifest.shards if s.kind == "packed" and s.encoding == name)
    width = packed.seq_len + 1
    stored = sum(s.stored_tokens or 0 for s in tok_shards)
    if rows != packed.rows or rows != (stored - packed.dropped_tokens) // width:
        report.problems.append(f"{packed.path}: {rows} rows do not add up to the token stream")
        return
    if not rows:
        return
    with open_parquet(fs, join(root, paths[0])) as parquet:
        first = parquet.read_row_group(0, columns=["input_ids"])
    stream: list[int] = []
    for s in tok_shards:
        col = _read_columns(fs, root, [s.path], ["input_ids"]).column("input_ids")
        stream += col.combine_chunks().flatten().to_numpy().tolist()[: width - len(stream)]
        if len(stream) >= width:
            break
    if first.column("input_ids")[0].values.to_numpy().tolist() != stream:
        report.problems.append(f"{paths[0]}: row 0 is not the start of the token stream")


def _round_trip(
    fs: fsspec.AbstractFileSystem,
    root: str,
    manifest: Manifest,
    report: VerifyReport,
    sample: int,
    seed: int,
) -> None:
    shards = manifest.shards
    text_paths = manifest.shard_paths("text")
    # ids of every document (a small column); the text itself only for the sampled ones
    located: list[tuple[str, int]] = []
    ids: list[str] = []
    for rel in text_paths:
        col = _read_columns(fs, root, [rel], ["id"]).column("id").to_pylist()
        ids += col
        located += [(rel, row) for row in range(len(col))]
    if len(ids) != manifest.documents:
        report.problems.append(f"text/: {len(ids)} documents, manifest says {manifest.documents}")
    chosen = random.Random(seed).sample(range(len(ids)), min(sample, len(ids)))
    sampled: dict[int, tuple[str, int]] = {}  # document index -> (text, n_tokens)
    for rel in sorted({located[i][0] for i in chosen}):
        table = _read_columns(fs, root, [rel], ["text", "n_tokens"])
        for i in chosen:
            if located[i][0] == rel:
                row = located[i][1]
                sampled[i] = (
                    table.column("text")[row].as_py(),
                    table.column("n_tokens")[row].as_py(),
                )
    for name, entry in manifest.tokens.items():
        tok_shards = [s for s in shards if s.kind == "tokens" and s.encoding == name]
        stored = sum(s.stored_tokens or 0 for s in tok_shards)
        if stored != entry.stored_tokens:
            report.problems.append(
                f"{entry.path}: {stored} tokens in shards, manifest says {entry.stored_tokens}"
            )
        # which shard and row holds each id, from the id column alone
        where: dict[str, tuple[str, int]] = {}
        for s in tok_shards:
            col = _read_columns(fs, root, [s.path], ["id"]).column("id").to_pylist()
            where.update({doc_id: (s.path, row) for row, doc_id in enumerate(col)})
        if missing := set(ids) - set(where):
            report.problems.append(
                f"{entry.path}: {len(missing)} documents of text/ have no tokens "
                f"(e.g. {sorted(missing)[0]})"
            )
        if packed := entry.packed:
            _check_packed(fs, root, manifest, name, packed, tok_shards, report)
        try:
            enc = get_encoding(name)
        except EncodingUnavailable as e:
            report.notes.append(f"{name}: round trip skipped: {e}")
            continue
        by_shard: dict[str, list[tuple[int, int]]] = {}
        for i in chosen:
            if ids[i] in where:
                path, row = where[ids[i]]
                by_shard.setdefault(path, []).append((row, i))
        for path, pairs in by_shard.items():
            table = _read_columns(fs, root, [path], ["input_ids", "n_tokens"])
            for row, i in pairs:
                input_ids = table.column("input_ids")[row].values.to_numpy().tolist()
                text, text_n_tokens = sampled[i]
                n_tokens = table.column("n_tokens")[row].as_py()
                if not input_ids or input_ids[-1] != enc.eot_token:
                    report.problems.append(f"{path}: row {row}: does not end with end-of-text")
                elif enc.decode_bytes(input_ids[:-1]) != decoded_bytes(enc, text):
                    report.problems.append(f"{path}: row {row}: decode(input_ids) != text")
                elif n_tokens != len(input_ids) - 1:
                    report.problems.append(f"{path}: row {row}: n_tokens {n_tokens} is wrong")
                elif name == manifest.primary_encoding and text_n_tokens != n_tokens:
                    report.problems.append(f"{path}: row {row}: n_tokens differs from text/")
                report.round_trips += 1


def verify(location: str | Path, *, sample: int = 64, seed: int = 0) -> VerifyReport:
    """Check a version; the report's `problems` each name the file at fault."""
    fs, root = filesystem(location)
    report = VerifyReport(location=str(location))
    manifest_path = join(root, MANIFEST)
    try:
        with fs.open(manifest_path, "rb") as f:
            manifest = Manifest.parse(f.read(), MANIFEST)
    except FileNotFoundError:
        report.problems.append(f"{MANIFEST}: missing, so {location} is not a dataset version")
        return report
    except ManifestError as e:
        report.problems.append(str(e))
        return report
    for shard in manifest.shards:
        if Path(shard.path).is_absolute() or ".." in Path(shard.path).parts:
            report.problems.append(f"{shard.path}: not a path inside the version")
            continue
        _check_shard(fs, root, shard, manifest, report, checksums=True)
    listed = {s.path for s in manifest.shards}
    for pattern in ("text/*.parquet", "rejected/*.parquet", "tokens/*/*.parquet"):
        for found in sorted(fs.glob(join(root, pattern))):
            rel = found[len(root) + 1 :] if root else found
            if rel not in listed:
                report.problems.append(
                    f"{rel}: not in the manifest, yet readers that glob the shards would read it"
                )
    if report.ok:  # a round trip over shards already known bad would only repeat the news
        _round_trip(fs, root, manifest, report, sample, seed)
    return report
