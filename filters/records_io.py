"""What the filter commands write (kept.parquet, rejected.parquet, counts.json) and the
classifier's labelled data they read; the documents they read come from filters/inputs.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from booksmith.filters.base import ChainResult
from booksmith.filters.inputs import iter_tables
from booksmith.filters.quality import Labelled
from booksmith.schemas import Document, Rejected
from booksmith.schemas.arrow import to_table
from booksmith.schemas.filter_settings import FilterError
from booksmith.schemas.records import sha256_hex
from booksmith.shards.files import tmp_name
from booksmith.shards.writer import atomic_write_bytes, commit


def read_labelled(path: Path) -> tuple[list[Labelled], int]:
    """(labelled texts, rows skipped for having no score) from annotations or any JSONL/Parquet
    file with `text` and a numeric `score`."""
    out, skipped = [], 0
    if not path.is_file():
        raise FilterError(f"{path}: training data not found (run `booksmith quality annotate`)")
    rows = (r for t in iter_tables(path, required=("text", "score")) for r in t.to_pylist())
    for n, row in enumerate(rows, 1):
        where = f"{path}: record {n}"
        score = row["score"]
        if score is None:
            skipped += 1
            continue
        if not isinstance(score, int | float) or isinstance(score, bool):
            raise FilterError(f"{where}: `score` must be a number, got {score!r}")
        key = str(row.get("id") if row.get("id") is not None else sha256_hex(str(row["text"])))
        out.append(Labelled(id=key, text=str(row["text"]), score=float(score)))
    return out, skipped


def rejected_table(result: ChainResult) -> pa.Table:
    """The Rejected columns, `detail` included (JSON: the figures that decided each one)."""
    return to_table(result.rejected, Rejected)


def _with_extras(table: pa.Table, extras: pa.Table, rows: list[int]) -> pa.Table:
    """`table` with the input's own columns of `rows` appended (a name the output already has
    keeps the output's column)."""
    taken = extras.take(pa.array(rows, pa.int64()))
    for name in taken.column_names:
        if name not in table.column_names:
            table = table.append_column(name, taken.column(name))
    return table


def write_outputs(out: Path, result: ChainResult) -> dict[str, Any]:
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
        self.kept: pq.ParquetWriter | None = None
        self.kept_tmp = tmp_name(out / "kept.parquet")
        self.rejected: pq.ParquetWriter | None = None
        self.rejected_tmp = tmp_name(out / "rejected.parquet")
        self.by_reason: dict[str, int] = {}
        self.per_filter: dict[str, dict[str, int]] = {}
        self.n_kept = self.n_rejected = 0

    def add(
        self,
        result: ChainResult,
        docs: list[Document] | None = None,
        extras: pa.Table | None = None,
    ) -> None:
        """One batch's result; with the batch's `docs`, rejections are written in input order
        (else filter by filter), so the output does not depend on the batch size, and the
        input's own columns (`extras`, row for row with `docs`) are carried through to both
        files, as `booksmith dedup` does."""
        position: dict[str, int] = {}
        if docs is not None:
            for i, d in enumerate(docs):
                position.setdefault(d.id, i)
            order = sorted(
                range(len(result.rejected)), key=lambda k: position[result.rejected[k].id]
            )
            result = ChainResult(
                kept=result.kept,
                rejected=[result.rejected[k] for k in order],
                counts=result.counts,
            )
        kept = to_table(result.kept, Document)
        rejected = rejected_table(result)
        if extras is not None and docs is not None:
            kept = _with_extras(kept, extras, [position[d.id] for d in result.kept])
            rejected = _with_extras(rejected, extras, [position[r.id] for r in result.rejected])
        if self.kept is None:
            self.kept = pq.ParquetWriter(self.kept_tmp, kept.schema, compression="zstd")
        self.kept.write_table(kept.cast(self.kept.schema))
        if self.rejected is None:
            schema = rejected.schema
            self.rejected = pq.ParquetWriter(self.rejected_tmp, schema, compression="zstd")
        self.rejected.write_table(rejected.cast(self.rejected.schema))
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
            self.add(ChainResult(kept=[], rejected=[], counts={}))
        assert self.rejected is not None and self.kept is not None
        self.kept.close()
        self.rejected.close()
        commit(self.kept_tmp, self.out / "kept.parquet")
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
            for writer, tmp in ((self.kept, self.kept_tmp), (self.rejected, self.rejected_tmp)):
                if writer is not None:
                    writer.close()
                tmp.unlink(missing_ok=True)
