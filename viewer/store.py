"""The versions under an output directory (or one version), read for the viewer.

Everything is read through the project's filesystem layer (shards/fs.py), so a local output and
an export in an object store (`s3://bucket/prefix`) read the same way. Lists, counts, groupings
and single rows are DuckDB queries over the Parquet shards: they read the small columns, and
of the text only the pages that hold the rows shown. Nothing loads a version whole, so a
version of a million documents pages as fast as a small one (benchmarks/viewer_scale.py).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any

import duckdb

from booksmith.schemas.manifest import Manifest, ManifestError
from booksmith.shards.fs import filesystem, is_url, join
from booksmith.shards.version_dir import MANIFEST, STATE_DIR

PAGE = 50  # documents per page, unless a link asks for another number (`per`)
MAX_PAGE = 500
RELIST_S = 5.0  # how long a listing of the versions is reused
SNIPPET = 300  # characters of text shown in a list
AXES = ("subject", "audience", "style", "format")
# A grounded document's provenance filters (schemas/records.Grounding): select boxes of the
# values present, and the source record's id typed in. Versions written before grounded
# generation lack the columns; topic-only runs since hold them all null: neither shows them.
GROUNDED = ("recipe", "source_name", "license")
SOURCE_ID = "source_id"
EXACT = ("topic", *AXES, *GROUNDED, SOURCE_ID)  # the filters that match a column's value
LIST_COLUMNS = (
    "id",
    "topic",
    "subject",
    "audience",
    "style",
    "format",
    "quality_score",
    "n_tokens",
)
REJECT_COLUMNS = ("reason", "duplicate_of")
KINDS = ("text", "rejected")  # the shard kinds a document lives in
# Every shard of a kind, rows numbered per file (a page's texts are then read by row group).
SCAN = "read_parquet(?, filename=true, file_row_number=true, union_by_name=true)"


class ViewError(ValueError):
    """What the viewer cannot open: one line that names the location and the way on."""


@dataclass(frozen=True)
class Query:
    """A document list: which shards, the filters (each optional) and the page."""

    kind: str = "text"  # "text" (kept) or "rejected"
    topic: str | None = None
    subject: str | None = None
    audience: str | None = None
    style: str | None = None
    format: str | None = None
    recipe: str | None = None
    source_name: str | None = None
    license: str | None = None
    source_id: str | None = None
    reason: str | None = None  # rejected only: a full reason or its family ("dedup_minhash")
    qmin: float | None = None
    qmax: float | None = None
    text: str | None = None  # full-text search (search.py)
    page: int = 1
    per: int = PAGE  # documents per page

    @property
    def offset(self) -> int:
        return (max(self.page, 1) - 1) * self.per

    def filters(self) -> dict[str, Any]:
        """The set filters, as query-string parameters (for links to other pages)."""
        keys = ("kind", *EXACT, "reason", "qmin", "qmax", "text")
        found = {k: getattr(self, k) for k in keys if getattr(self, k) not in (None, "")}
        return found | ({"per": self.per} if self.per != PAGE else {})

    def at_page(self, page: int) -> Query:
        return replace(self, page=page)


@dataclass
class Page:
    rows: list[dict[str, Any]]
    total: int
    capped: bool = False  # `total` is a lower bound (a search with very many matches)


@dataclass(frozen=True)
class Where:
    """A row's place: shard kind, the shard's index in the manifest, the row within it."""

    kind: str
    file: int
    row: int

    def token(self) -> str:
        return f"{self.kind[0]}{self.file}-{self.row}"

    @staticmethod
    def parse(token: str) -> Where | None:
        kinds = {k[0]: k for k in KINDS}
        head, _, row = token[1:].partition("-")
        if token[:1] not in kinds or not head.isdigit() or not row.isdigit():
            return None
        return Where(kinds[token[0]], int(head), int(row))


def where_sql(q: Query) -> tuple[str, list[Any]]:
    """The WHERE clause of a list query (DuckDB and SQLite share the syntax) and its values."""
    clauses, values = [], []
    for axis in EXACT:  # only the set ones: a version without a column is queried without it
        if getattr(q, axis):
            clauses.append(f"{axis} = ?")
            values.append(getattr(q, axis))
    if q.reason and q.kind == "rejected":
        clauses.append("(reason = ? OR reason LIKE ?)")
        values += [q.reason, f"{q.reason}:%"]
    if q.qmin is not None:
        clauses.append("quality_score >= ?")
        values.append(q.qmin)
    if q.qmax is not None:
        clauses.append("quality_score <= ?")
        values.append(q.qmax)
    return (" WHERE " + " AND ".join(clauses)) if clauses else "", values


@dataclass
class Version:
    """One version: its manifest and the files its queries read."""

    output: Output
    run_id: str
    manifest: Manifest
    stamp: Any = None  # the manifest file's mtime or ETag when read (a takedown rewrites it)
    cache: dict[str, Any] = field(default_factory=dict)  # groupings, computed once

    @property
    def path(self) -> str:
        return join(self.output.root, self.run_id)

    def files(self, kind: str) -> list[str]:
        """The version's shards of `kind`, in the manifest's order (rows are numbered in it)."""
        return [join(self.path, s.path) for s in self.manifest.shards if s.kind == kind and s.rows]

    def has(self, relative: str) -> bool:
        return bool(self.output.fs.exists(join(self.path, relative)))

    def cached(self, key: str, compute: Any) -> Any:
        if key not in self.cache:
            self.cache[key] = compute()
        return self.cache[key]

    # -- queries ---------------------------------------------------------------------------

    def page(self, q: Query) -> Page:
        """A page of documents (no full-text search: that is search.py's)."""
        files = self.files(q.kind)
        if not files:
            return Page([], 0)
        cols = list(LIST_COLUMNS) + (list(REJECT_COLUMNS) if q.kind == "rejected" else [])
        where, values = where_sql(q)
        src = [self.output.uri(f) for f in files]
        sql = (
            f"SELECT {', '.join(cols)}, left(text, {SNIPPET + 1}) AS snippet, filename, "
            f"file_row_number FROM {SCAN}{where} LIMIT {q.per} OFFSET {q.offset}"
        )
        with self.output.cursor() as cur:
            rows = _dicts(cur.execute(sql, [src, *values]))
            total = cur.execute(f"SELECT count(*) FROM {SCAN}{where}", [src, *values])
            n = total.fetchone()[0]
        index = {u: i for i, u in enumerate(src)}
        for row in rows:
            row["where"] = Where(q.kind, index[row.pop("filename")], row.pop("file_row_number"))
            row["snippet"] = snippet(row["snippet"] or "")
        return Page(rows, n)

    def add_snippets(self, rows: list[dict[str, Any]]) -> None:
        """Each row's first SNIPPET characters of text (rows found by the search index)."""
        texts = self.read_rows([r["where"] for r in rows], [f"left(text, {SNIPPET + 1}) AS text"])
        for row, got in zip(rows, texts, strict=True):
            row["snippet"] = snippet(got["text"] if got else "")

    def read_rows(self, places: list[Where], select: list[str] | None) -> list[dict | None]:
        """The rows at `places` (None where a place is out of range): one query per shard.
        DuckDB reads only the pages that hold them, 2.4 times faster than pyarrow reading their
        whole row groups when a page's 50 rows are scattered over a shard."""
        out: list[dict | None] = [None] * len(places)
        by_file: dict[tuple[str, int], list[int]] = {}
        for k, w in enumerate(places):
            by_file.setdefault((w.kind, w.file), []).append(k)
        columns = ", ".join(select or ["* EXCLUDE (file_row_number)"])
        sql = (
            f"SELECT {columns}, file_row_number AS _row FROM read_parquet(?, "
            "file_row_number=true) WHERE list_contains(?, file_row_number)"
        )
        for (kind, file), ks in by_file.items():
            files = self.files(kind)
            if not 0 <= file < len(files):
                continue
            with self.output.cursor() as cur:
                got = _dicts(
                    cur.execute(sql, [self.output.uri(files[file]), [places[k].row for k in ks]])
                )
            rows = {r.pop("_row"): r for r in got}
            for k in ks:
                out[k] = rows.get(places[k].row)
        return out

    def find(self, doc_id: str, hint: Where | None = None) -> tuple[Where, dict] | None:
        """A document by id, kept or rejected, with its place; `hint` is tried first."""
        if hint is not None:
            got = self.read_rows([hint], None)[0]
            if got is not None and got.get("id") == doc_id:
                return hint, got
        for kind in KINDS:
            files = self.files(kind)
            if not files:
                continue
            src = [self.output.uri(f) for f in files]
            sql = f"SELECT filename, file_row_number FROM {SCAN} WHERE id = ? LIMIT 1"
            with self.output.cursor() as cur:
                hit = cur.execute(sql, [src, doc_id]).fetchone()
            if hit:
                where = Where(kind, src.index(hit[0]), int(hit[1]))
                row = self.read_rows([where], None)[0]
                assert row is not None
                return where, row
        return None

    def request(self, doc_id: str) -> dict[str, Any] | None:
        """The plan row that made a document (its id is the request's): messages and sampling."""
        plan = self.files("plan")
        if not plan:
            return None
        sql = "SELECT * EXCLUDE (id) FROM read_parquet(?) WHERE id = ? LIMIT 1"
        with self.output.cursor() as cur:
            rows = _dicts(cur.execute(sql, [[self.output.uri(plan[0])], doc_id]))
        return rows[0] if rows else None

    def columns(self, kind: str) -> frozenset[str]:
        """The columns of a kind's shards (none without shards); read from their footers once."""

        def read() -> frozenset[str]:
            files = self.files(kind)
            if not files:
                return frozenset()
            sql = "SELECT * FROM read_parquet(?, union_by_name=true) LIMIT 0"
            with self.output.cursor() as cur:
                described = cur.execute(sql, [[self.output.uri(f) for f in files]]).description
            return frozenset(d[0] for d in described)

        return self.cached(f"columns-{kind}", read)

    def grounded_facets(self, kind: str) -> dict[str, list[tuple[Any, ...]]]:
        """(value, documents) of each GROUNDED column that a kind's shards have and some
        document fills; none for a version before grounding or from topics only."""

        def count() -> dict[str, list[tuple[Any, ...]]]:
            found = {}
            for column in GROUNDED:
                if column in self.columns(kind):
                    rows = [r for r in self.group_counts(kind, (column,)) if r[0] is not None]
                    if rows:
                        found[column] = rows
            return found

        return self.cached(f"grounded-{kind}", count)

    def has_source_ids(self, kind: str) -> bool:
        """Whether some document of a kind records its source record's id."""

        def look() -> bool:
            if SOURCE_ID not in self.columns(kind):
                return False
            src = [self.output.uri(f) for f in self.files(kind)]
            sql = f"SELECT 1 FROM {SCAN} WHERE {SOURCE_ID} IS NOT NULL LIMIT 1"
            with self.output.cursor() as cur:
                return cur.execute(sql, [src]).fetchone() is not None

        return self.cached(f"source-ids-{kind}", look)

    def group_counts(self, kind: str, columns: tuple[str, ...]) -> list[tuple[Any, ...]]:
        """(value of each column..., documents) over one kind's shards, largest first."""
        files = self.files(kind)
        if not files:
            return []
        cols = ", ".join(columns)
        sql = (
            f"SELECT {cols}, count(*) AS n FROM read_parquet(?, union_by_name=true) "
            f"GROUP BY {cols} ORDER BY n DESC, {cols}"
        )
        with self.output.cursor() as cur:
            return [
                tuple(r) for r in cur.execute(sql, [[self.output.uri(f) for f in files]]).fetchall()
            ]

    def samples_by_reason(self, per_reason: int = 3) -> dict[str, list[dict[str, Any]]]:
        """The first few rejected documents of each reason (in shard order), with snippets."""
        files = self.files("rejected")
        if not files:
            return {}
        src = [self.output.uri(f) for f in files]
        sql = (
            "SELECT reason, id, topic, duplicate_of, filename, file_row_number FROM ("
            "SELECT *, row_number() OVER (PARTITION BY reason ORDER BY filename, "
            f"file_row_number) AS k FROM {SCAN}) WHERE k <= ? "
            "ORDER BY reason, k"
        )
        with self.output.cursor() as cur:
            rows = _dicts(cur.execute(sql, [src, per_reason]))
        index = {u: i for i, u in enumerate(src)}
        for row in rows:
            row["where"] = Where("rejected", index[row.pop("filename")], row.pop("file_row_number"))
        self.add_snippets(rows)
        out: dict[str, list[dict[str, Any]]] = {}
        for row in rows:
            out.setdefault(row["reason"], []).append(row)
        return out


def snippet(text: str) -> str:
    return text[:SNIPPET] + ("…" if len(text) > SNIPPET else "")


def _dicts(cursor: Any) -> list[dict[str, Any]]:
    names = [d[0] for d in cursor.description]
    return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]


class Output:
    """An output directory's versions (or the one version given), local or at a URL."""

    def __init__(self, location: str) -> None:
        self.location = location.rstrip("/") or location
        try:
            self.fs, root = filesystem(location)
            found = self.fs.exists(root)
        except (ValueError, OSError) as e:
            raise ViewError(f"{location}: cannot open it ({e})") from None
        if not found:
            raise ViewError(f"{location}: no such file or directory")
        if self.fs.isfile(root):
            raise ViewError(f"{location}: a file; give an output directory or a dataset version")
        self.is_url = is_url(location)
        self.given: str | None = None  # the version given, when one was
        if self.fs.exists(join(root, MANIFEST)):
            root, _, self.given = root.rpartition("/")
        self.root = root
        protocol = self.fs.protocol
        self.protocol = protocol[0] if isinstance(protocol, tuple | list) else protocol
        self._db = duckdb.connect(config={"threads": 2})
        if self.is_url:
            self._db.register_filesystem(self.fs)
        self._versions: dict[str, Version] = {}
        self._lock = threading.Lock()
        self._listed: tuple[float, list[str]] | None = None
        if not self.run_ids():
            raise ViewError(
                f"{location}: no dataset versions here (a version is a folder with {MANIFEST}; "
                "`booksmith run --out DIR` writes them)"
            )

    def uri(self, path: str) -> str:
        """A path as DuckDB reads it: local as is, otherwise through the registered fsspec."""
        return f"{self.protocol}://{path}" if self.is_url else path

    def cursor(self) -> Any:
        return self._db.cursor()  # one per request: a connection is not shared across threads

    def run_ids(self) -> list[str]:
        """Versions, oldest first (run ids sort by time); listed again after a few seconds, so
        a new night's version appears without a restart and an object store is not listed on
        every page."""
        now = time.monotonic()
        if self._listed is None or now - self._listed[0] > RELIST_S:
            self._listed = (now, self._list())
        return self._listed[1]

    def _list(self) -> list[str]:
        names = []
        for entry in self.fs.ls(self.root, detail=False):
            name = str(entry).rstrip("/").rsplit("/", 1)[-1]
            if name == STATE_DIR or name.startswith("."):
                continue
            if self.fs.exists(join(join(self.root, name), MANIFEST)):
                names.append(name)
        return sorted(names)

    def version(self, run_id: str) -> Version:
        """A version, its manifest read again when the file changed (after a takedown)."""
        if "/" in run_id or run_id.startswith(".") or run_id == STATE_DIR:
            raise KeyError(run_id)
        where = join(join(self.root, run_id), MANIFEST)
        try:
            info = self.fs.info(where)
        except FileNotFoundError:
            raise KeyError(run_id) from None
        stamp = info.get("mtime") or info.get("ETag") or info.get("LastModified") or info["size"]
        with self._lock:
            known = self._versions.get(run_id)
            if known is not None and known.stamp == stamp:
                return known
        try:
            manifest = Manifest.parse(self.fs.cat_file(where), f"{self.uri(where)}")
        except ManifestError as e:
            raise ViewError(str(e)) from None
        v = Version(self, run_id, manifest, stamp)
        with self._lock:
            self._versions[run_id] = v
        return v
