"""Crash-safe Parquet writing: temporary name, fsync, rename; the manifest goes last.

A reader never sees half a shard: until the rename, the file has a temporary name, and until
the manifest exists, the directory is not a dataset. `ShardWriter` streams tables into
`part-NNNNN.parquet` files (ZSTD, row groups sized for streaming), starting a new shard when
one reaches its row or byte limit.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel

from booksmith.schemas.arrow import arrow_schema, to_table
from booksmith.schemas.crashpoints import crash_point
from booksmith.schemas.manifest import ShardEntry, ShardKind
from booksmith.shards.files import (
    file_sha256,
    replace_atomically,
    tmp_name,
    write_bytes_atomically,
)

ROW_GROUP_ROWS = 2_000  # small enough to stream a shard, large enough to compress well
ROW_GROUP_BYTES = 64 << 20  # and at most this much uncompressed Arrow data per row group
DEFAULT_SHARD_BYTES = 256 << 20  # about 256 MB per shard on disk (checked after each row group)
COMPRESSION = "zstd"
# min/max statistics of whole documents would bloat every footer and prune nothing
NO_STATISTICS = frozenset({"text", "prompt", "sampling", "input_ids"})


def _statistics_columns(schema: pa.Schema) -> list[str]:
    """Leaf column paths that get min/max statistics (all but NO_STATISTICS)."""
    paths: list[str] = []

    def walk(prefix: str, dtype: pa.DataType) -> None:
        if pa.types.is_struct(dtype):
            for f in dtype:
                walk(f"{prefix}.{f.name}", f.type)
        elif isinstance(dtype, pa.ListType | pa.LargeListType | pa.FixedSizeListType):
            walk(f"{prefix}.list.element", dtype.value_type)
        else:
            paths.append(prefix)

    for f in schema:
        if f.name not in NO_STATISTICS:
            walk(f.name, f.type)
    return paths


def commit(tmp: Path, path: Path) -> None:
    """fsync a finished temporary file and give it its final name (a version's file: the kill
    tests count this crash point)."""
    replace_atomically(tmp, path)
    crash_point("shards.file")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """A version's small file (card, manifest): written atomically, then the crash point."""
    write_bytes_atomically(path, data)
    crash_point("shards.file")


def describe(path: Path, *, root: Path, rows: int, kind: ShardKind, **extra: Any) -> ShardEntry:
    return ShardEntry(
        path=path.relative_to(root).as_posix(),
        rows=rows,
        bytes=path.stat().st_size,
        sha256=file_sha256(path),
        kind=kind,
        **extra,
    )


class ShardWriter:
    """Stream tables into `root/subdir/part-NNNNN.parquet`, each shard closing at `max_rows`
    rows or once it holds `max_bytes` on disk (checked after each row group, so a shard can
    overshoot by at most one row group). Each shard is written under a temporary name and
    renamed when complete. `close()` returns the shards; with no rows at all it writes one
    empty shard, so readers always find the schema."""

    def __init__(
        self,
        root: Path,
        subdir: str,
        schema: pa.Schema,
        *,
        kind: ShardKind,
        max_rows: int | None = None,
        max_bytes: int | None = DEFAULT_SHARD_BYTES,
        row_group_rows: int = ROW_GROUP_ROWS,
        extra: dict[str, Any] | None = None,
        count: Callable[[pa.Table], dict[str, int]] | None = None,
    ) -> None:
        self.root, self.dir, self.schema, self.kind = root, root / subdir, schema, kind
        self.max_rows, self.max_bytes = max_rows, max_bytes
        self.row_group_rows = min(row_group_rows, max_rows or row_group_rows)
        # a row group's uncompressed size stays under the shard's byte limit, so that one
        # row group never overshoots a shard by more than the limit itself
        self.row_group_bytes = min(ROW_GROUP_BYTES, max_bytes or ROW_GROUP_BYTES)
        self.extra = extra or {}
        self.count = count  # per-shard totals for the manifest (e.g. tokens), from each chunk
        self.shards: list[ShardEntry] = []
        self._writer: pq.ParquetWriter | None = None
        self._sink: pa.NativeFile | None = None
        self._tmp: Path | None = None
        self._rows = 0
        self._counters: dict[str, int] = {}

    def _path(self, index: int) -> Path:
        return self.dir / f"part-{index:05d}.parquet"

    def _open(self) -> pq.ParquetWriter:
        if self._writer is None:
            self.dir.mkdir(parents=True, exist_ok=True)
            self._tmp = tmp_name(self._path(len(self.shards)))
            self._sink = pa.OSFile(str(self._tmp), "wb")
            self._writer = pq.ParquetWriter(
                self._sink,
                self.schema,
                compression=COMPRESSION,
                write_page_index=True,
                write_statistics=_statistics_columns(self.schema),
            )
            self._rows = 0
            self._counters = {}
        return self._writer

    def _finish(self) -> None:
        assert self._writer is not None and self._sink is not None and self._tmp is not None
        self._writer.close()
        self._sink.close()
        path = self._path(len(self.shards))
        commit(self._tmp, path)
        extra = {**self.extra, **self._counters}
        self.shards.append(describe(path, root=self.root, rows=self._rows, kind=self.kind, **extra))
        self._writer = self._sink = self._tmp = None

    def write(self, table: pa.Table) -> None:
        """Append rows, rolling over to a new shard whenever one is full."""
        table = table.cast(self.schema) if table.schema != self.schema else table
        start = 0
        while start < table.num_rows:
            writer = self._open()
            room = self.row_group_rows
            if self.max_rows is not None:
                room = min(room, self.max_rows - self._rows)
            chunk = table.slice(start, room)
            if chunk.nbytes > self.row_group_bytes and chunk.num_rows > 1:
                rows = chunk.num_rows * self.row_group_bytes // chunk.nbytes
                chunk = chunk.slice(0, max(1, rows))
            writer.write_table(chunk, row_group_size=chunk.num_rows)
            self._rows += chunk.num_rows
            start += chunk.num_rows
            if self.count is not None:
                for key, value in self.count(chunk).items():
                    self._counters[key] = self._counters.get(key, 0) + value
            assert self._sink is not None
            full_rows = self.max_rows is not None and self._rows >= self.max_rows
            full_bytes = self.max_bytes is not None and self._sink.tell() >= self.max_bytes
            if full_rows or full_bytes:
                self._finish()

    def close(self) -> list[ShardEntry]:
        if self._writer is not None:
            self._finish()
        if not self.shards:
            self._open()
            self._finish()
        return self.shards

    def abort(self) -> None:
        """Drop the shard being written (its temporary file); finished shards stay."""
        if self._writer is not None:
            self._writer.close()
            assert self._sink is not None and self._tmp is not None
            self._sink.close()
            self._tmp.unlink(missing_ok=True)
            self._writer = self._sink = self._tmp = None

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        if exc_type is not None:
            self.abort()


def write_shards(
    records: Sequence[BaseModel],
    model: type[BaseModel],
    *,
    root: Path,
    subdir: str,
    kind: ShardKind,
    shard_rows: int | None,
    shard_bytes: int | None = DEFAULT_SHARD_BYTES,
) -> list[ShardEntry]:
    """Write records as `root/subdir/part-NNNNN.parquet`, each shard closing at `shard_rows`
    rows or `shard_bytes` bytes on disk, whichever comes first (None: no such limit)."""
    with ShardWriter(
        root, subdir, arrow_schema(model), kind=kind, max_rows=shard_rows, max_bytes=shard_bytes
    ) as writer:
        for start in range(0, len(records), ROW_GROUP_ROWS):
            writer.write(to_table(records[start : start + ROW_GROUP_ROWS], model))
        return writer.close()
