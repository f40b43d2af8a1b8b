"""Write one dataset version: shards first, then the card, the manifest last.

Layout (see docs/design.md): text/, tokens/<encoding>/ (and packed rows if asked), rejected/,
plan.parquet, failures.parquet, README.md (the dataset card), and manifest.json with every
file's rows, bytes and sha256, tokens per encoding, counts per stage and reason.
"""

from __future__ import annotations

import shutil
import subprocess
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import cache
from importlib import metadata
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel

from booksmith.schemas import (
    SCHEMA_VERSION,
    Document,
    GenerationRequest,
    GenerationResult,
    Rejected,
)
from booksmith.schemas.arrow import arrow_schema, to_table
from booksmith.schemas.crashpoints import crash_point
from booksmith.schemas.manifest import (
    Counts,
    Diversity,
    EncodingEntry,
    Manifest,
    QualityHistogram,
    ShardEntry,
    ShardKind,
)
from booksmith.shards.card import render_card
from booksmith.shards.encodings import EncodingSpec, get_encoding
from booksmith.shards.tokens import (
    TokenResult,
    TokenShardWriter,
    with_end_of_text,
    write_token_shards,
)
from booksmith.shards.version_dir import MANIFEST, read_manifest
from booksmith.shards.writer import (
    COMPRESSION,
    DEFAULT_SHARD_BYTES,
    ROW_GROUP_ROWS,
    ShardWriter,
    atomic_write_bytes,
    commit,
    describe,
    tmp_name,
)

CARD = "README.md"
ITER_ROWS = 2_000  # rows per batch when a shard is read back


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


def commit_manifest(root: Path, manifest: Manifest) -> None:
    """Write the card, then the manifest: only once the manifest is renamed into place is the
    directory a (new) dataset version."""
    atomic_write_bytes(root / CARD, render_card(manifest).encode("utf-8"))
    atomic_write_bytes(root / MANIFEST, manifest.to_json().encode("utf-8"))


class VersionWriter:
    """Stream one dataset version into `root`: kept and rejected rows as they come (each shard
    written under a temporary name, row group by row group), plan and failure rows likewise,
    then `finish()` writes the token shards from the finished text shards, the card, and the
    manifest last. Memory holds a row group per open file, whatever the version's size.

    A directory that already is a version is never overwritten; leftovers of an attempt that
    died before its manifest are cleared first (readers that glob must not see them)."""

    def __init__(
        self,
        root: Path,
        *,
        shard_rows: int | None,
        shard_bytes: int | None = DEFAULT_SHARD_BYTES,
        encoded: str | None = None,
        pack_seq_len: int | None = None,
    ) -> None:
        """`encoded`: the encoding whose token ids the kept rows bring along (an `input_ids`
        column, as a run has them from counting `n_tokens`); its token shards are written from
        those ids as the rows come, not encoded again (`pack_seq_len` as `write_tokens` gets
        it)."""
        if (root / MANIFEST).exists():
            raise FileExistsError(f"{root}: already a dataset version (it has {MANIFEST})")
        clear_leftovers(root)
        root.mkdir(parents=True, exist_ok=True)
        self.root = root
        self.shard_rows, self.shard_bytes = shard_rows, shard_bytes
        self.text = ShardWriter(
            root, "text", arrow_schema(Document), kind="text", max_rows=shard_rows,
            max_bytes=shard_bytes,
        )  # fmt: skip
        self.rejected = ShardWriter(
            root, "rejected", arrow_schema(Rejected), kind="rejected", max_rows=shard_rows,
            max_bytes=shard_bytes,
        )  # fmt: skip
        self.plan = SingleFileWriter(root, "plan.parquet", GenerationRequest, kind="plan")
        self.failures = SingleFileWriter(
            root, "failures.parquet", GenerationResult, kind="failures"
        )
        self.languages: Counter[str] = Counter()
        self.documents = 0
        self.shards: list[ShardEntry] = []
        self.tokens: dict[str, EncodingEntry] = {}
        self.encoded: TokenShardWriter | None = None
        if encoded is not None:
            self.encoded = TokenShardWriter(
                get_encoding(encoded), root=root, shard_rows=shard_rows, shard_bytes=shard_bytes,
                pack_seq_len=pack_seq_len,
            )  # fmt: skip
        self.encoded_whole = True  # every kept row brought its ids

    def add_kept(self, table: pa.Table) -> None:
        """Rows of `Document`'s schema (extra columns are dropped but `input_ids`, see
        `encoded`)."""
        if self.encoded is not None and self.encoded_whole:
            ids = table.column("input_ids") if "input_ids" in table.column_names else None
            if ids is None or ids.null_count:  # e.g. a chunk spilled by an older booksmith
                self.encoded_whole = False
            elif table.num_rows:
                enc = self.encoded.enc
                self.encoded.add(with_end_of_text(enc, table.column("id"), ids.combine_chunks()))
        table = table.select(self.text.schema.names)
        self.text.write(table)
        self.documents += table.num_rows
        for lang, n in Counter(table.column("lang").to_pylist()).items():
            if lang:
                self.languages[lang] += n

    def add_rejected(self, table: pa.Table) -> None:
        self.rejected.write(table.select(self.rejected.schema.names))

    def write_tokens(
        self,
        encoding: str,
        encodings: Sequence[EncodingSpec | str] = (),
        pack_seq_len: int | None = None,
        num_threads: int | None = None,
    ) -> None:
        """Close the text shards and tokenize them, streamed back, with `encoding` (the primary
        one, that `n_tokens` counts in) and each of `encodings`; `pack_seq_len` adds packed rows
        of that length + 1 for each."""
        self.shards = list(self.text.close())
        text_shards = [s.path for s in self.shards]
        specs = [EncodingSpec(encoding), *(EncodingSpec.of(e) for e in encodings)]
        for spec in {s.name: s for s in specs}.values():
            if (given := self._given_tokens(spec, pack_seq_len)) is not None:
                self.shards += given.shards + given.packed_shards
                self.tokens[spec.name] = given.manifest_entry(self.encoded.enc)  # type: ignore[union-attr]
                continue
            enc = spec.load()
            result = write_token_shards(
                iter_texts(self.root, text_shards),
                enc,
                root=self.root,
                shard_rows=self.shard_rows,
                shard_bytes=self.shard_bytes,
                num_threads=num_threads,
                pack_seq_len=pack_seq_len,
            )
            self.shards += result.shards + result.packed_shards
            self.tokens[enc.name] = result.manifest_entry(enc)
        if self.encoded is not None and self.encoded.enc.name not in self.tokens:
            self.encoded.discard(self.root)  # ids of an encoding not asked for after all

    def _given_tokens(self, spec: EncodingSpec, pack_seq_len: int | None) -> TokenResult | None:
        """The token shards written from the rows' own ids, when they are this encoding's and
        every row brought them; otherwise they are thrown away and the text is encoded."""
        if self.encoded is None or spec.name != self.encoded.enc.name or spec.bpe_file:
            return None
        if self.encoded_whole and pack_seq_len == self.encoded.pack_seq_len:
            return self.encoded.close()
        self.encoded.discard(self.root)
        self.encoded = None
        return None

    def finish(
        self,
        *,
        run_id: str,
        encoding: str,
        config: dict[str, Any],
        config_hash: str,
        counts: Counts,
        card: dict[str, Any] | None = None,
        seed: int | None = None,
        run_key: str | None = None,
        diversity: Diversity | None = None,
        quality: QualityHistogram | None = None,
    ) -> Manifest:
        """The remaining files, the card, then the manifest (after `write_tokens`)."""
        assert self.tokens, "write_tokens() first"
        shards = self.shards + self.rejected.close()
        shards.append(self.plan.close())
        shards.append(self.failures.close())
        manifest = Manifest(
            run_id=run_id,
            schema_version=SCHEMA_VERSION,
            code_version=code_version(),
            config_hash=config_hash,
            config=config,
            counts=counts,
            documents=self.documents,
            primary_encoding=encoding,
            tokens=self.tokens,
            languages=dict(self.languages),
            diversity=diversity or Diversity(),
            quality=quality,
            card=card or {},
            shards=shards,
            seed=seed,
            run_key=run_key,
        )
        crash_point("shards.manifest")
        commit_manifest(self.root, manifest)  # last: only now is the directory a dataset
        return manifest

    def abort(self) -> None:
        for w in (self.text, self.rejected):
            w.abort()
        if self.encoded is not None:
            self.encoded.abort()
        self.plan.abort()
        self.failures.abort()


class SingleFileWriter:
    """One Parquet file written row group by row group under a temporary name (plan.parquet,
    failures.parquet), renamed into place by `close()`."""

    def __init__(self, root: Path, name: str, model: type[BaseModel], *, kind: ShardKind) -> None:
        self.root, self.path, self.model, self.kind = root, root / name, model, kind
        self.tmp = tmp_name(self.path)
        self.schema = arrow_schema(model)
        self.rows = 0
        self._writer: pq.ParquetWriter | None = None

    def write(self, records: Sequence[BaseModel]) -> None:
        self.write_table(to_table(records, self.model))

    def write_table(self, table: pa.Table) -> None:
        if not table.num_rows:
            return
        if self._writer is None:
            self._writer = pq.ParquetWriter(
                self.tmp, self.schema, compression=COMPRESSION, write_page_index=True
            )
        self._writer.write_table(table, row_group_size=ROW_GROUP_ROWS)
        self.rows += table.num_rows

    def close(self) -> ShardEntry:
        if self._writer is None:  # no rows: an empty file, so readers still find the schema
            self._writer = pq.ParquetWriter(self.tmp, self.schema, compression=COMPRESSION)
        self._writer.close()
        self._writer = None
        commit(self.tmp, self.path)
        return describe(self.path, root=self.root, rows=self.rows, kind=self.kind)

    def abort(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        self.tmp.unlink(missing_ok=True)


@dataclass
class InMemoryVersion:
    """A whole version's records held in memory (small tools and tests; a run streams through
    VersionWriter instead)."""

    run_id: str
    kept: Sequence[Document]
    rejected: Sequence[Rejected] = ()
    plan: Sequence[GenerationRequest] = ()
    failures: Sequence[GenerationResult] = ()
    encoding: str = "cl100k_base"  # the primary one, that `n_tokens` counts in
    encodings: Sequence[EncodingSpec | str] = ()  # token shards in these too
    config: dict[str, Any] = field(default_factory=dict)
    config_hash: str = ""
    counts: Counts = field(default_factory=Counts)
    card: dict[str, Any] | None = None  # the dataset card's license, language, pretty_name


@dataclass(frozen=True)
class ShardLayout:
    """How the files are cut: rows or bytes per shard, packed rows of `pack_seq_len` + 1."""

    shard_rows: int | None = None
    shard_bytes: int | None = DEFAULT_SHARD_BYTES
    pack_seq_len: int | None = None
    num_threads: int | None = None


def write_version(
    root: Path, version: InMemoryVersion, layout: ShardLayout | None = None
) -> Manifest:
    """Write every file of `version`, then its card and manifest; returns the manifest."""
    v, layout = version, layout or ShardLayout()
    writer = VersionWriter(root, shard_rows=layout.shard_rows, shard_bytes=layout.shard_bytes)
    try:
        for start in range(0, max(len(v.kept), len(v.rejected), len(v.plan)), ROW_GROUP_ROWS):
            end = start + ROW_GROUP_ROWS
            if v.kept[start:end]:
                writer.add_kept(to_table(v.kept[start:end], Document))
            if v.rejected[start:end]:
                writer.add_rejected(to_table(v.rejected[start:end], Rejected))
            writer.plan.write(v.plan[start:end])
        writer.failures.write(v.failures)
        writer.write_tokens(v.encoding, v.encodings, layout.pack_seq_len, layout.num_threads)
        return writer.finish(
            run_id=v.run_id,
            encoding=v.encoding,
            config=v.config,
            config_hash=v.config_hash,
            counts=v.counts,
            card=v.card,
        )
    except BaseException:
        writer.abort()
        raise


def iter_texts(root: Path, text_shards: Sequence[str]) -> Iterator[tuple[str, str]]:
    """(id, text) of every kept document, streamed from the text shards in order."""
    for path in text_shards:
        # Batches of the rows a row group holds, not pyarrow's default 65,536 (a whole shard).
        batches = pq.ParquetFile(root / path).iter_batches(ITER_ROWS, columns=["id", "text"])
        for batch in batches:
            yield from zip(batch.column(0).to_pylist(), batch.column(1).to_pylist(), strict=True)


def add_encoding(
    root: Path,
    spec: EncodingSpec | str,
    *,
    shard_rows: int | None = None,
    shard_bytes: int | None = DEFAULT_SHARD_BYTES,
    pack_seq_len: int | None = None,
    num_threads: int | None = None,
) -> Manifest:
    """Tokenize an existing version's text shards with one more encoding (a version may carry
    several); rewrites the card and then the manifest. A crash before the manifest leaves the
    old manifest, which does not list the new files."""
    spec = EncodingSpec.of(spec)
    manifest = read_manifest(root)
    enc = spec.load()
    if enc.name in manifest.tokens:
        raise ValueError(f"{root / MANIFEST}: tokens: {enc.name!r} is already in this version")
    stale = root / "tokens" / enc.name
    for leftover in stale.glob("*.parquet") if stale.is_dir() else []:
        leftover.unlink()  # from a crashed earlier attempt: never in a manifest
    result = write_token_shards(
        iter_texts(root, manifest.shard_paths("text")),
        enc,
        root=root,
        shard_rows=shard_rows,
        shard_bytes=shard_bytes,
        num_threads=num_threads,
        pack_seq_len=pack_seq_len,
    )
    manifest.tokens[enc.name] = result.manifest_entry(enc)
    manifest.shards += result.shards + result.packed_shards
    commit_manifest(root, manifest)
    return manifest
