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

from filters.quality import Labelled
from filters.scored import DetailedChainResult
from filters.settings import FilterError
from schemas import Document, Rejected, arrow_schema
from schemas.arrow import to_table
from schemas.jsonl import iter_jsonl
from schemas.records import sha256_hex
from shards.writer import atomic_write_bytes, atomic_write_table

_JSONL = (".jsonl", ".json", ".ndjson")
_PARQUET = (".parquet", ".pq")


def _rows(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, row) for each record of a JSONL or Parquet file; `where` is `file:line`."""
    suffix = path.suffix.lower()
    if suffix in _JSONL:
        for lineno, row in iter_jsonl(path, FilterError):
            yield f"{path}:{lineno}", row
    elif suffix in _PARQUET:
        try:
            table = pq.read_table(path)
        except (pa.ArrowInvalid, OSError) as e:
            raise FilterError(f"{path}: cannot read as Parquet: {e}") from None
        for i, row in enumerate(table.to_pylist()):
            yield f"{path}:row {i}", row
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
    from shards.encodings import count_tokens
    from shards.version import is_dataset

    if path.is_dir():
        if not is_dataset(path):
            raise FilterError(f"{path}: a directory without manifest.json is not a dataset")
        docs = []
        for shard in sorted((path / "text").glob("part-*.parquet")):
            for row in pq.read_table(shard, schema=arrow_schema(Document)).to_pylist():
                docs.append(Document.model_validate(row))
        return docs
    if not path.is_file():
        raise FilterError(f"{path}: input not found")
    docs = [_document(where, row) for where, row in _rows(path)]
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
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_table(to_table(result.kept, Document), out / "kept.parquet", root=out, kind="kept")
    atomic_write_table(rejected_table(result), out / "rejected.parquet", root=out, kind="rejected")
    by_reason: dict[str, int] = {}
    for r in result.rejected:
        by_reason[r.reason] = by_reason.get(r.reason, 0) + 1
    counts = {
        "input": len(result.kept) + len(result.rejected),
        "kept": len(result.kept),
        "rejected": len(result.rejected),
        "by_reason": dict(sorted(by_reason.items())),
        "per_filter": result.counts,
    }
    atomic_write_bytes(out / "counts.json", json.dumps(counts, indent=2).encode())
    return counts
