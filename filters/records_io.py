"""Reading what the filter commands take (a dataset version, or any JSONL/Parquet file of
`{id, text}`) and writing what they give (kept.parquet, rejected.parquet, counts.json).

A user's records keep their ids verbatim; columns a Document has and the file lacks get empty
defaults, and `n_tokens` is counted with the primary encoding when the file has none.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from booksmith.filters.quality import Labelled
from booksmith.filters.scored import DetailedChainResult
from booksmith.schemas import Document, Rejected, arrow_schema
from booksmith.schemas.arrow import to_table
from booksmith.schemas.filter_settings import FilterError
from booksmith.schemas.jsonl import iter_jsonl
from booksmith.schemas.records import sha256_hex
from booksmith.shards.dataset import SingleFileWriter
from booksmith.shards.files import tmp_name
from booksmith.shards.writer import atomic_write_bytes, commit

_JSONL = (".jsonl", ".json", ".ndjson")
_PARQUET = (".parquet", ".pq")
BATCH_DOCS = 5_000  # documents a streamed read holds at once


def _rows(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, row) for each record of a JSONL or Parquet file; `where` is `file:line`."""
    suffix = path.suffix.lower()
    if suffix in _JSONL:
        for lineno, row in iter_jsonl(path, FilterError):
            yield f"{path}:{lineno}", row
    elif suffix in _PARQUET:
        try:
            batches = pq.ParquetFile(path).iter_batches(BATCH_DOCS)
            i = 0
            for batch in batches:
                for row in batch.to_pylist():
                    yield f"{path}:row {i}", row
                    i += 1
        except (pa.ArrowInvalid, OSError) as e:
            raise FilterError(f"{path}: cannot read as Parquet: {e}") from None
    else:
        raise FilterError(f"{path}: unknown input format (use .jsonl or .parquet)")


def _document(where: str, row: dict[str, Any]) -> Document:
    if "text" not in row:
        raise FilterError(f"{where}: no `text` field (fields: {', '.join(row) or 'none'})")
    if row.get("id") is None:
        raise FilterError(f"{where}: no `id` field")
    text = row["text"]
    if not isinstance(text, str):
        raise FilterError(f"{where}: `text` must be a string, got {type(text).__name__}")
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
    )


def read_documents(path: Path, encoding: str = "cl100k_base") -> list[Document]:
    """Documents of a dataset version (its text shards) or of a JSONL/Parquet file."""
    return [d for batch in iter_documents(path, encoding) for d in batch]


def iter_documents(
    path: Path, encoding: str = "cl100k_base", batch_docs: int | None = None
) -> Iterator[list[Document]]:
    """`read_documents` as a stream of lists of at most `batch_docs` documents: a corpus larger
    than memory is read a batch at a time."""
    from booksmith.shards.version import is_dataset, read_manifest

    size = batch_docs or BATCH_DOCS
    if path.is_dir():
        if not is_dataset(path):
            raise FilterError(f"{path}: a directory without manifest.json is not a dataset")
        for rel in read_manifest(path).shard_paths("text"):
            parquet = pq.ParquetFile(path / rel)
            for record_batch in parquet.iter_batches(size):
                table = pa.Table.from_batches([record_batch]).cast(arrow_schema(Document))
                yield [Document.model_validate(row) for row in table.to_pylist()]
        return
    if not path.is_file():
        raise FilterError(f"{path}: input not found")
    batch: list[Document] = []
    for where, row in _rows(path):
        batch.append(_document(where, row))
        if len(batch) == size:
            yield _counted(batch, encoding)
            batch = []
    if batch:
        yield _counted(batch, encoding)


def _counted(docs: list[Document], encoding: str) -> list[Document]:
    """Token counts for documents whose file gave none."""
    from booksmith.shards.encodings import count_tokens

    missing = [i for i, d in enumerate(docs) if d.n_tokens < 0]
    if missing:
        counts = count_tokens([docs[i].text for i in missing], encoding)
        for i, n in zip(missing, counts, strict=True):
            docs[i].n_tokens = n
    return docs


def read_labelled(path: Path) -> tuple[list[Labelled], int]:
    """(labelled texts, rows skipped for having no score) from annotations or any JSONL/Parquet
    file with `text` and a numeric `score`."""
    out, skipped = [], 0
    if not path.is_file():
        raise FilterError(f"{path}: training data not found (run `booksmith quality annotate`)")
    for where, row in _rows(path):
        if "text" not in row or "score" not in row:
            raise FilterError(f"{where}: training rows need `text` and `score` fields")
        score = row["score"]
        if score is None:
            skipped += 1
            continue
        if not isinstance(score, int | float) or isinstance(score, bool):
            raise FilterError(f"{where}: `score` must be a number, got {score!r}")
        key = str(row.get("id") if row.get("id") is not None else sha256_hex(str(row["text"])))
        out.append(Labelled(id=key, text=str(row["text"]), score=float(score)))
    return out, skipped


def rejected_table(result: DetailedChainResult) -> pa.Table:
    """The Rejected columns plus `detail` (JSON: the figures that decided each rejection)."""
    table = to_table(result.rejected, Rejected)
    if "detail" in table.schema.names:  # the schema already carries it
        return table
    return table.append_column(
        pa.field("detail", pa.string()), pa.array(result.details, pa.string())
    )


def write_outputs(out: Path, result: DetailedChainResult) -> dict[str, Any]:
    """DIR/kept.parquet, DIR/rejected.parquet and DIR/counts.json; returns the counts."""
    with OutputWriter(out) as writer:
        writer.add(result)
        return writer.close()


class OutputWriter:
    """DIR/kept.parquet and DIR/rejected.parquet written batch by batch (temporary names until
    `close`), then DIR/counts.json with the counts summed over the batches."""

    def __init__(self, out: Path) -> None:
        out.mkdir(parents=True, exist_ok=True)
        self.out = out
        self.kept = SingleFileWriter(out, "kept.parquet", Document, kind="text")
        self.rejected: pq.ParquetWriter | None = None
        self.rejected_tmp = tmp_name(out / "rejected.parquet")
        self.by_reason: dict[str, int] = {}
        self.per_filter: dict[str, dict[str, int]] = {}
        self.n_kept = self.n_rejected = 0

    def add(self, result: DetailedChainResult, docs: list[Document] | None = None) -> None:
        """One batch's result; with the batch's `docs`, rejections are written in input order
        (else filter by filter), so the output does not depend on the batch size."""
        if docs is not None:
            position: dict[str, int] = {}
            for i, d in enumerate(docs):
                position.setdefault(d.id, i)
            order = sorted(
                range(len(result.rejected)), key=lambda k: position[result.rejected[k].id]
            )
            result = DetailedChainResult(
                kept=result.kept,
                rejected=[result.rejected[k] for k in order],
                counts=result.counts,
                details=[result.details[k] for k in order] if result.details else [],
            )
        self.kept.write(result.kept)
        table = rejected_table(result)
        if self.rejected is None:
            self.rejected = pq.ParquetWriter(self.rejected_tmp, table.schema, compression="zstd")
        self.rejected.write_table(table)
        self.n_kept += len(result.kept)
        self.n_rejected += len(result.rejected)
        for r in result.rejected:
            self.by_reason[r.reason] = self.by_reason.get(r.reason, 0) + 1
        for name, counts in result.counts.items():
            mine = self.per_filter.setdefault(name, {})
            for key, n in counts.items():
                mine[key] = mine.get(key, 0) + n

    def close(self) -> dict[str, Any]:
        if self.rejected is None:
            self.add(DetailedChainResult(kept=[], rejected=[], counts={}))
        assert self.rejected is not None
        self.kept.close()
        self.rejected.close()
        commit(self.rejected_tmp, self.out / "rejected.parquet")
        counts = {
            "input": self.n_kept + self.n_rejected,
            "kept": self.n_kept,
            "rejected": self.n_rejected,
            "by_reason": dict(sorted(self.by_reason.items())),
            "per_filter": self.per_filter,
        }
        atomic_write_bytes(self.out / "counts.json", json.dumps(counts, indent=2).encode())
        return counts

    def __enter__(self) -> OutputWriter:
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        if exc_type is not None:
            self.kept.abort()
            if self.rejected is not None:
                self.rejected.close()
            self.rejected_tmp.unlink(missing_ok=True)
