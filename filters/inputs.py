"""The one reader of what users bring to `booksmith dedup`, `booksmith filter` and the quality
judge: a dataset version (its text shards), or any JSONL or Parquet file of `{id, text, ...}`,
read as a stream of Arrow tables so a corpus larger than memory is fine.

Bad input is one InputError naming the file and the line (JSONL) or record (Parquet): a
missing id or text, text that is not a string, a column the first batch did not have.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from booksmith.schemas import Document, arrow_schema
from booksmith.schemas.arrow import conform
from booksmith.schemas.jsonl import iter_jsonl
from booksmith.schemas.manifest import ManifestError
from booksmith.schemas.records import GROUNDING_COLUMNS, sha256_hex
from booksmith.shards.version_dir import is_dataset, read_manifest

BATCH_ROWS = 10_000  # records a batch holds: what a pass over the input holds at once
JSONL = (".jsonl", ".ndjson", ".json")
PARQUET = (".parquet", ".pq")


class InputError(ValueError):
    """Input a user can fix; the message names the file, line or record."""


def iter_tables(
    path: Path,
    batch_rows: int | None = None,
    required: tuple[str, ...] = ("id", "text"),
    uniform: bool = True,
) -> Iterator[pa.Table]:
    """Tables of at most `batch_rows` records, each with the `required` fields (an `id` is
    never null; a `text` is a string). `uniform`: every table has the first one's columns and
    ids keep their JSON type (what `booksmith dedup` writes back); else a JSONL batch has the
    columns its own records have, and ids are text (as a Document's)."""
    batch_rows = batch_rows or BATCH_ROWS
    if not path.exists():
        raise InputError(f"{path}: input not found (no such file or directory)")
    if path.is_dir():
        if not is_dataset(path):
            raise InputError(f"{path}: a directory without manifest.json is not a dataset version")
        try:
            files = [path / rel for rel in read_manifest(path).shard_paths("text")]
        except ManifestError as e:
            raise InputError(str(e)) from None
        batches = _parquet_batches(files, batch_rows)
    elif path.suffix.lower() in JSONL:
        batches = _jsonl_batches(path, batch_rows, required, uniform)
    elif path.suffix.lower() in PARQUET:
        batches = _parquet_batches([path], batch_rows)
    else:
        raise InputError(f"{path}: expected a dataset directory, .jsonl or .parquet file")
    row = 0
    for table in batches:
        _check(path, table, row, required)
        row += table.num_rows
        yield table


def check_row(where: str, row: dict[str, Any], required: tuple[str, ...]) -> None:
    for name in required:
        if row.get(name) is None if name == "id" else name not in row:
            raise InputError(f"{where}: no `{name}` field (fields: {', '.join(row) or 'none'})")
    text = row.get("text")
    if text is not None and not isinstance(text, str):
        raise InputError(f"{where}: `text` must be a string, got {type(text).__name__}")


def _check(path: Path, table: pa.Table, first_row: int, required: tuple[str, ...]) -> None:
    for column in required:
        if column not in table.column_names:
            needed = " and ".join(f"`{c}`" for c in required)
            raise InputError(f"{path}: no `{column}` column (records need {needed})")
    if table.num_rows and "id" in required and table.column("id").null_count:
        row = pc.index(pc.is_null(table.column("id")), True).as_py()
        raise InputError(f"{path}: record {first_row + row + 1} has no id")
    if "text" not in table.column_names:
        return
    text_type = table.schema.field("text").type
    if table.num_rows and not (
        pa.types.is_string(text_type) or pa.types.is_large_string(text_type) or
        pa.types.is_null(text_type)
    ):  # fmt: skip
        raise InputError(f"{path}: column `text` must hold strings, not {text_type}")


def _jsonl_batches(
    path: Path, batch_rows: int, required: tuple[str, ...], uniform: bool
) -> Iterator[pa.Table]:
    """JSONL as tables of `batch_rows` records, with the columns any record of the batch has
    (null where one lacks it). `uniform`: later batches take the first one's columns, and a
    record with a column the first batch lacked is an error naming its line."""
    schema: pa.Schema | None = None
    rows: list[dict[str, Any]] = []
    lines: list[int] = []

    def table() -> pa.Table:
        nonlocal schema
        try:
            if schema is None or not uniform:
                names = list(dict.fromkeys(k for row in rows for k in row))
                t = pa.table({k: [row.get(k) for row in rows] for k in names})
                schema = t.schema
                return t
            for lineno, row in zip(lines, rows, strict=True):
                extra = set(row) - set(schema.names)
                if extra:
                    raise InputError(
                        f"{path}:{lineno}: column(s) {sorted(extra)} not in the first "
                        f"{batch_rows} records; give every record the same keys"
                    )
            return pa.Table.from_pylist(rows, schema=schema)
        except (pa.ArrowException, TypeError) as e:
            where = f"{path}:{lines[0]}-{lines[-1]}"
            raise InputError(f"{where}: records have inconsistent column types ({e})") from None

    for lineno, row in iter_jsonl(path, InputError):
        check_row(f"{path}:{lineno}", row, required)
        if not uniform and row.get("id") is not None:
            row["id"] = str(row["id"])  # a Document's id is text: 7 and "7" are one id
        rows.append(row)
        lines.append(lineno)
        if len(rows) == batch_rows:
            yield table()
            rows, lines = [], []
    if rows or schema is None:
        yield table() if rows else pa.table({"id": pa.array([], pa.string()),
                                             "text": pa.array([], pa.string())})  # fmt: skip


def _parquet_batches(files: list[Path], batch_rows: int) -> Iterator[pa.Table]:
    for f in files:
        try:
            parquet = pq.ParquetFile(f)
            for batch in parquet.iter_batches(batch_rows):
                yield pa.Table.from_batches([batch])
            if parquet.metadata.num_rows == 0:
                yield parquet.schema_arrow.empty_table()
        except (OSError, pa.ArrowException) as e:
            raise InputError(f"{f}: unreadable Parquet ({e})") from None


# -- as Documents (the quality chain's input) -----------------------------------------------


def iter_documents(
    path: Path, encoding: str = "cl100k_base", batch_docs: int | None = None
) -> Iterator[list[Document]]:
    """Documents of a dataset version (as written) or of a user's file (ids kept verbatim,
    the columns a Document has and the file lacks left empty, `n_tokens` counted with
    `encoding` when the file has none), a batch at a time."""
    for docs, _ in iter_batches(path, encoding, batch_docs):
        yield docs


def iter_batches(
    path: Path, encoding: str = "cl100k_base", batch_docs: int | None = None
) -> Iterator[tuple[list[Document], pa.Table | None]]:
    """`iter_documents`, each batch with the user file's own columns that a Document does not
    have (row for row; None for a dataset version), so outputs can carry them through."""
    version = path.is_dir()
    own = set(arrow_schema(Document).names)
    first: list[str] | None = None  # the first batch's own columns: every batch has those
    rows = 0
    for table in iter_tables(path, batch_docs, uniform=False):
        if version:
            table = conform(table, arrow_schema(Document))  # older versions lack columns
            yield [Document.model_validate(row) for row in table.to_pylist()], None
            continue
        docs = _counted([user_document(row) for row in table.to_pylist()], encoding)
        extra = [c for c in table.column_names if c not in own]
        if first is None:
            first = extra
        elif late := sorted(set(extra) - set(first)):
            raise InputError(
                f"{path}: column(s) {late} first appear after record {rows}; put them in the "
                "first records (or none) so every output row has the same columns"
            )
        for name in first:  # a later batch whose records lack a column: null there
            if name not in table.column_names:
                table = table.append_column(name, pa.nulls(table.num_rows))
        rows += table.num_rows
        yield docs, table.select(first) if first else None


def read_documents(path: Path, encoding: str = "cl100k_base") -> list[Document]:
    return [d for batch in iter_documents(path, encoding) for d in batch]


def user_document(row: dict[str, Any]) -> Document:
    """A Document from a user's record: its id verbatim (as text), its text, the few
    provenance columns it has (topic, model, finish_reason, n_tokens, -1: not counted yet;
    license and the other grounding columns)."""
    text = row["text"] or ""
    finish = row.get("finish_reason")
    n_tokens = row.get("n_tokens")
    return Document(
        id=str(row["id"]),
        text_sha256=sha256_hex(text),
        text=text,
        topic=str(row.get("topic") or ""),
        topic_path=[],
        audience="",
        style="",
        format="",
        seed_words=[],
        prompt="",
        model=str(row.get("model") or ""),
        backend="",
        sampling="{}",
        seed=0,
        sample_index=0,
        finish_reason=finish if isinstance(finish, str) else None,
        truncated=finish == "length",
        n_tokens=n_tokens if isinstance(n_tokens, int) else -1,  # -1: counted below
        run_id="",
        created_at=datetime.now(UTC),
        **_grounding(row),
    )


def _grounding(row: dict[str, Any]) -> dict[str, Any]:
    """The record's own provenance where it has columns of a grounded Document's names (its
    `license`, say): they are Document columns now, so they are carried there."""
    out: dict[str, Any] = {}
    for name in GROUNDING_COLUMNS:
        value = row.get(name)
        if value is None:
            continue
        numeric = name in ("source_passage", "source_start", "source_end")
        if numeric and isinstance(value, int) and not isinstance(value, bool):
            out[name] = value
        elif not numeric:
            out[name] = str(value)
    return out


def _counted(docs: list[Document], encoding: str) -> list[Document]:
    """Token counts for documents whose file gave none."""
    from booksmith.shards.encodings import count_tokens

    missing = [i for i, d in enumerate(docs) if d.n_tokens < 0]
    if missing:
        counts = count_tokens([docs[i].text for i in missing], encoding)
        for i, n in zip(missing, counts, strict=True):
            docs[i].n_tokens = n
    return docs
