"""Reading benchmark test sets for decontamination: JSONL, Parquet or CSV files with named text
fields, or a Hugging Face dataset (`hf:NAME[:CONFIG]:SPLIT`, where there is a network).

A spec is `PATH` or `NAME=PATH`; the benchmark's name (used in `contaminated:<name>`) defaults to
the file name up to its first dot (`mmlu.test.jsonl` -> `mmlu`). Text fields are the ones named,
or else every column among DEFAULT_FIELDS that the file has. A list value (choices) is joined
with spaces; a nested mapping contributes its strings (ARC's `choices.text`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from booksmith.schemas.filter_settings import FilterError
from booksmith.schemas.jsonl import iter_jsonl

DEFAULT_FIELDS = (
    "question",
    "prompt",
    "problem",
    "text",
    "passage",
    "context",
    "ctx",
    "sentence",
    "goal",
    "query",
    "choices",
    "endings",
    "options",
    "answer",
    "solution",
)


@dataclass(frozen=True)
class BenchmarkItem:
    benchmark: str
    row: int  # 0-based row in the file
    field: str
    text: str


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list | tuple):
        return [s for v in value for s in _strings(v)]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    return []  # numbers (answer indexes), None, booleans: nothing to match


def _rows_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    for _, row in iter_jsonl(path, FilterError):
        yield row


def _rows_table(path: Path, fmt: str) -> list[dict[str, Any]]:
    import pyarrow as pa

    try:
        if fmt == "parquet":
            import pyarrow.parquet as pq

            table = pq.read_table(path)
        else:
            import pyarrow.csv as pcsv

            table = pcsv.read_csv(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise FilterError(f"{path}: cannot read as {fmt}: {e}") from None
    rows: list[dict[str, Any]] = table.to_pylist()
    return rows


def _rows_hf(spec: str) -> tuple[str, list[dict[str, Any]]]:
    parts = spec[len("hf:") :].split(":")
    if len(parts) not in (2, 3):
        raise FilterError(f"{spec}: expected hf:NAME:SPLIT or hf:NAME:CONFIG:SPLIT")
    name, config, split = parts[0], (parts[1] if len(parts) == 3 else None), parts[-1]
    try:
        import datasets
    except ImportError:
        raise FilterError(
            f"{spec}: Hugging Face benchmarks need the `datasets` package and a network; "
            "or download the test set and pass its file"
        ) from None
    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as e:  # the datasets library raises many kinds
        raise FilterError(f"{spec}: cannot load the dataset: {e}") from None
    return name.rsplit("/", 1)[-1], list(ds)


def load_benchmark(spec: str, fields: Sequence[str] | None = None) -> list[BenchmarkItem]:
    """Every (row, field) text of one benchmark."""
    name, _, location = spec.partition("=") if "=" in spec else ("", "", spec)
    rows: Sequence[dict[str, Any]] | Iterator[dict[str, Any]]
    if location.startswith("hf:"):
        default_name, rows = _rows_hf(location)
        source = location
    else:
        path = Path(location)
        source = str(path)
        if not path.is_file():
            raise FilterError(f"{path}: benchmark file not found")
        default_name = path.name.split(".")[0]
        suffixes = [s.lower() for s in path.suffixes]
        if suffixes and suffixes[-1] in (".jsonl", ".json", ".ndjson"):
            rows = list(_rows_jsonl(path))
        elif suffixes and suffixes[-1] in (".parquet", ".pq"):
            rows = _rows_table(path, "parquet")
        elif suffixes and suffixes[-1] in (".csv",):
            rows = _rows_table(path, "csv")
        else:
            raise FilterError(f"{path}: unknown benchmark format (use .jsonl, .parquet or .csv)")
    name = name or default_name
    rows = list(rows)
    columns: list[str] = []
    for row in rows:
        columns.extend(k for k in row if k not in columns)
    if fields:
        missing = [f for f in fields if f not in columns]
        if missing:
            have = ", ".join(columns) or "none"
            raise FilterError(f"{source}: no column {', '.join(missing)} (columns: {have})")
        use = list(fields)
    else:
        use = [f for f in DEFAULT_FIELDS if f in columns]
        if not use:
            raise FilterError(
                f"{source}: no text column found among {', '.join(DEFAULT_FIELDS)} "
                f"(columns: {', '.join(columns) or 'none'}); name them with --benchmark-fields"
            )
    items = []
    for i, row in enumerate(rows):
        for field in use:
            text = " ".join(_strings(row.get(field)))
            if text.strip():
                items.append(BenchmarkItem(benchmark=name, row=i, field=field, text=text))
    return items
