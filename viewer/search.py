"""Full-text search over a version: an SQLite FTS5 index, built once per version.

DuckDB's `fts` extension downloads itself on first use (no network here), so the index is
SQLite's FTS5, in the standard library. It is contentless (the texts stay in the Parquet
shards) and has `detail=none` (no positions): a quarter of the text's size and 45% faster to
build than with positions, at the price of phrase queries; a search is all of its words.

One table beside it holds each row's place and the list's filter columns, so a search with
filters is one SQLite query. The index lives outside the checksummed version: under the
output's `_state/view/` (or the user cache for a URL or a read-only output), named by the
manifest's hash, so a takedown (a new manifest) gets a fresh index.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import re
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from booksmith.shards.bundled import cache_dir
from booksmith.shards.fs import filesystem
from booksmith.shards.version_dir import STATE_DIR
from booksmith.viewer.store import (
    AXES,
    GROUNDED,
    KINDS,
    SOURCE_ID,
    Page,
    Query,
    Version,
    Where,
    where_sql,
)

BATCH = 2_000  # rows per insert, one Parquet row group
COUNT_CAP = 10_000  # a search counts its matches up to this, then says "10,000+"
_WORD = re.compile(r"\w+", re.UNICODE)
# A shard without a column (the provenance ones, before grounding) is read without it (pyarrow
# skips the names a file lacks) and stores it null.
DOC_COLUMNS = ("id", "topic", *AXES, "quality_score", "n_tokens", *GROUNDED, SOURCE_ID)
REJECT = ("reason", "duplicate_of")
# Named into the index's file: an index of an earlier layout (without the provenance columns)
# is built again rather than queried for columns it lacks.
LAYOUT = 2

SCHEMA = f"""
CREATE TABLE docs (
    rowid INTEGER PRIMARY KEY, kind TEXT, file INTEGER, row INTEGER, id TEXT, topic TEXT,
    {", ".join(f"{a} TEXT" for a in AXES)}, quality_score REAL, n_tokens INTEGER,
    {", ".join(f"{a} TEXT" for a in (*GROUNDED, SOURCE_ID))}, reason TEXT, duplicate_of TEXT
);
CREATE VIRTUAL TABLE fts USING fts5(
    text, content='', columnsize=0, detail=none, tokenize='unicode61 remove_diacritics 2'
);
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT);
"""


def match_expression(text: str) -> str | None:
    """A user's words as an FTS5 query: each word quoted (no operator syntax gets through),
    all of them required. None when there is no word to look for."""
    words = _WORD.findall(text)
    return " ".join(f'"{w}"' for w in words) if words else None


def index_dir(version: Version) -> Path:
    """Where a version's index lives: the output's `_state/view/` when it is a local, writable
    directory, otherwise the user cache (keyed by the output's location)."""
    out = version.output
    if not out.is_url:
        local = Path(out.root) / STATE_DIR / "view" / version.run_id
        try:
            local.mkdir(parents=True, exist_ok=True)
            if os.access(local, os.W_OK):
                return local
        except OSError:
            pass
    key = hashlib.sha256(out.uri(out.root).encode()).hexdigest()[:16]
    path = cache_dir() / "view" / key / version.run_id
    path.mkdir(parents=True, exist_ok=True)
    return path


@dataclass
class Build:
    """A build in progress (or failed), for the page that waits on it."""

    done: int = 0
    total: int = 0
    error: str | None = None


class SearchIndex:
    """One version's index: built on first use in a child process (its memory and CPU stay out
    of the server's, which keeps answering pages meanwhile), then queried read-only."""

    def __init__(self, version: Version) -> None:
        self.version = version
        key = f"layout {LAYOUT}\n{version.manifest.to_json()}"
        digest = hashlib.sha256(key.encode()).hexdigest()[:16]
        self.path = index_dir(version) / f"search-{digest}.sqlite"
        self.progress = self.path.with_suffix(".progress")
        self._process: BaseProcess | None = None
        self._lock = threading.Lock()

    @property
    def ready(self) -> bool:
        return self.path.is_file()

    def start(self) -> Build:
        """Start building unless built or building; the build's progress."""
        with self._lock:
            running = self._process is not None and self._process.is_alive()
            if not running and not self.ready and not self._failed():
                files = {kind: self.version.files(kind) for kind in KINDS}
                self.progress.write_text(f"0 {sum(map(len, files.values()))}")
                self._process = multiprocessing.get_context("spawn").Process(
                    target=build_index,
                    args=(self.version.output.location, files, str(self.path)),
                    name="search-index",
                    daemon=True,
                )
                self._process.start()
        return self.status()

    def _failed(self) -> bool:
        return self._process is not None and self._process.exitcode not in (None, 0)

    def status(self) -> Build:
        try:
            done, total, *error = self.progress.read_text().split(" ", 2)
            build = Build(int(done), int(total), error[0] if error else None)
        except (OSError, ValueError):
            build = Build()
        if self._failed() and build.error is None:  # died before it could say why
            assert self._process is not None
            build.error = f"the build process stopped (exit code {self._process.exitcode})"
        return build

    def meta(self) -> dict[str, str]:
        with self._connect() as con:
            return dict(con.execute("SELECT key, value FROM meta").fetchall())

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, check_same_thread=False)

    def search(self, q: Query) -> Page:
        """A page of matches in shard order, with the list's filters applied."""
        expression = match_expression(q.text or "")
        if expression is None:
            return Page([], 0)
        where, values = where_sql(q)
        where = where.replace(" WHERE ", " AND ", 1)
        base = f"FROM fts JOIN docs ON docs.rowid = fts.rowid WHERE fts MATCH ? AND kind = ?{where}"
        args = [expression, q.kind, *values]
        con = self._connect()
        try:
            cur = con.execute(
                f"SELECT docs.* {base} ORDER BY fts.rowid LIMIT {q.per} OFFSET {q.offset}", args
            )
            names = [d[0] for d in cur.description]
            rows = [dict(zip(names, r, strict=True)) for r in cur.fetchall()]
            (total,) = con.execute(
                f"SELECT count(*) FROM (SELECT 1 {base} LIMIT {COUNT_CAP + 1})", args
            ).fetchone()
        finally:
            con.close()
        for row in rows:
            row["where"] = Where(row.pop("kind"), row.pop("file"), row.pop("row"))
            row.pop("rowid")
        self.version.add_snippets(rows)
        return Page(rows, min(total, COUNT_CAP), capped=total > COUNT_CAP)


def build_index(location: str, files: dict[str, list[str]], path: str) -> None:
    """The child process: write the index under a temporary name, then rename it into place
    (replacing an earlier manifest's); progress and a failure go to `<index>.progress`."""
    final = Path(path)
    tmp, progress = final.with_suffix(f".tmp-{os.getpid()}"), final.with_suffix(".progress")
    total = sum(map(len, files.values()))
    try:
        fs, _ = filesystem(location)
        start = time.perf_counter()
        rows = write_index(fs, files, tmp, lambda done: progress.write_text(f"{done} {total}"))
        with sqlite3.connect(tmp) as con:
            con.executemany(
                "INSERT INTO meta VALUES (?, ?)",
                [("documents", str(rows)), ("build_seconds", f"{time.perf_counter() - start:.1f}")],
            )
        con.close()
        for old in final.parent.glob("search-*.sqlite"):
            old.unlink()  # an earlier manifest's (before a takedown)
        tmp.replace(final)
    except Exception as e:  # shown on the page that waits for it
        progress.write_text(f"0 {total} {type(e).__name__}: {e}")
        tmp.unlink(missing_ok=True)
        raise SystemExit(1) from e


def write_index(
    fs: Any, files: dict[str, list[str]], path: Path, progress: Callable[[int], Any]
) -> int:
    """Stream every kept and rejected row into a new index at `path`; rows written."""
    path.unlink(missing_ok=True)
    con = sqlite3.connect(path)
    con.executescript("PRAGMA journal_mode=OFF; PRAGMA synchronous=OFF;" + SCHEMA)
    rowid, done = 0, 0
    for kind in KINDS:
        columns = [*DOC_COLUMNS, *(REJECT if kind == "rejected" else ())]
        for file, shard in enumerate(files.get(kind, [])):
            row = 0
            with fs.open(shard, "rb") as f:
                for batch in pq.ParquetFile(f).iter_batches(BATCH, columns=["text", *columns]):
                    data = batch.to_pydict()
                    n, ids = batch.num_rows, range(rowid, rowid + batch.num_rows)
                    values = [data.get(c, [None] * n) for c in (*DOC_COLUMNS, *REJECT)]
                    con.executemany(
                        f"INSERT INTO docs VALUES ({', '.join('?' * (4 + len(values)))})",
                        zip(ids, [kind] * n, [file] * n, range(row, row + n), *values, strict=True),
                    )
                    con.executemany(
                        "INSERT INTO fts (rowid, text) VALUES (?, ?)",
                        zip(ids, data["text"], strict=True),
                    )
                    rowid, row = rowid + n, row + n
            done += 1
            progress(done)
    con.commit()
    con.close()
    return rowid
