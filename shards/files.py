"""The file primitives everyone uses: a sha256, an fsync, and writes that a reader sees whole
or not at all (a temporary name, fsync, rename, fsync of the directory).

A dataset version's own files go through shards/writer.py's `commit`, which adds the crash
point the kill tests count; everything else (checkpoints, indexes, models, caches) writes
through here. URLs and object stores: shards/fs.py.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import IO, Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

BLOCK = 8 << 20  # bytes read at a time when hashing


def sha256_of(f: IO[bytes]) -> str:
    h = hashlib.sha256()
    while block := f.read(BLOCK):
        h.update(block)
    return h.hexdigest()


def file_sha256(path: Path | str, fs: fsspec.AbstractFileSystem | None = None) -> str:
    """sha256 of a local file, or of `path` inside `fs` (an object store)."""
    if fs is None:
        with open(path, "rb") as f:
            return sha256_of(f)
    with fs.open(str(path), "rb", block_size=BLOCK) as f:
        return sha256_of(f)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def tmp_name(path: Path) -> Path:
    """The temporary name a file has until it is complete (hidden, so no glob matches it)."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def replace_atomically(tmp: Path, path: Path) -> None:
    """fsync a finished temporary file (or directory) and give it its final name."""
    if tmp.is_file():
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def write_bytes_atomically(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_name(path)
    with open(tmp, "wb") as f:
        f.write(data)
    replace_atomically(tmp, path)


def write_json_atomically(path: Path, data: Any, indent: int | None = 2) -> None:
    body = json.dumps(data, indent=indent, ensure_ascii=False) + "\n"
    write_bytes_atomically(path, body.encode("utf-8"))


def write_table_atomically(table: pa.Table, path: Path, **parquet: Any) -> None:
    """One Parquet file (ZSTD unless `parquet` says otherwise)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_name(path)
    pq.write_table(table, tmp, **{"compression": "zstd", **parquet})
    replace_atomically(tmp, path)


class DiskFull(ValueError):
    """The disk filled while writing; the message says where and how to go on."""


def disk_full(e: BaseException) -> bool:
    """Whether `e` is the disk (or a quota) running out: an OSError's errno, SQLite's own
    "database or disk is full", or pyarrow's message for the same."""
    import errno
    import sqlite3

    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(e).lower()
    if isinstance(e, sqlite3.OperationalError) and "disk is full" in text:
        return True
    return isinstance(e, pa.ArrowException | OSError) and "no space left on device" in text
