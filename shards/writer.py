"""Crash-safe Parquet writing: temporary name, fsync, rename; the manifest goes last.

A reader never sees half a shard: until the rename, the file has a temporary name, and until
the manifest exists, the directory is not a dataset.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel

from schemas.arrow import to_table

ROW_GROUP_ROWS = 2_000  # small enough to stream a shard, large enough to compress well


@dataclass(frozen=True)
class ShardInfo:
    path: str  # relative to the dataset version's root
    rows: int
    bytes: int
    sha256: str
    kind: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def atomic_write_table(table: pa.Table, path: Path, *, root: Path, kind: str) -> ShardInfo:
    """Write one Parquet file (ZSTD) atomically and describe it for the manifest."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    pq.write_table(
        table,
        tmp,
        compression="zstd",
        row_group_size=ROW_GROUP_ROWS,
        write_page_index=True,
    )
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    return ShardInfo(
        path=path.relative_to(root).as_posix(),
        rows=table.num_rows,
        bytes=path.stat().st_size,
        sha256=file_sha256(path),
        kind=kind,
    )


def write_shards(
    records: Sequence[BaseModel],
    model: type[BaseModel],
    *,
    root: Path,
    subdir: str,
    kind: str,
    shard_rows: int,
) -> list[ShardInfo]:
    """Write records as `root/subdir/part-NNNNN.parquet`, at most `shard_rows` rows each.
    An empty input still writes one empty shard, so readers always find the schema."""
    infos = []
    starts = range(0, max(len(records), 1), shard_rows)
    for i, start in enumerate(starts):
        table = to_table(records[start : start + shard_rows], model)
        path = root / subdir / f"part-{i:05d}.parquet"
        infos.append(atomic_write_table(table, path, root=root, kind=kind))
    return infos


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    body = json.dumps(data, indent=2, sort_keys=False, ensure_ascii=False, default=str) + "\n"
    atomic_write_bytes(path, body.encode("utf-8"))
