"""`booksmith dedup` and `booksmith dedup-index`: dedup alone, on any corpus.

    booksmith dedup INPUT --out DIR [--against INDEX] [--commit-as RUN_ID] [--threshold J]

INPUT is a dataset version directory (its text shards) or a JSONL / Parquet file of records
with at least `id` and `text`; every other column is carried through untouched and ids are kept
verbatim. Writes DIR/kept.parquet and DIR/rejected.parquet (the input columns plus `reason` and
`duplicate_of`). INDEX (a directory, or redis://host:port/db?basename=NAME) is read only unless
`--commit-as` names the run id under which the kept records are then added.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Annotated

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import typer

from filters.dedup import (
    DedupIndexError,
    DedupSettings,
    find_duplicates,
    open_index_spec,
)
from filters.dedup.engine import index_entries
from filters.dedup.index import MANIFEST as INDEX_MANIFEST
from schemas.jsonl import iter_jsonl

index_app = typer.Typer(help="Inspect or edit a persistent dedup index.", no_args_is_help=True)


class InputError(ValueError):
    """Input a user can fix; the message names the file, line or column."""


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


def _read_jsonl(path: Path) -> pa.Table:
    rows = [row for _, row in iter_jsonl(path, InputError)]
    try:
        return pa.Table.from_pylist(rows)
    except (pa.ArrowException, TypeError) as e:
        raise InputError(f"{path}: records have inconsistent column types ({e})") from None


def read_input(path: Path) -> pa.Table:
    """A table with `id` and `text` from a dataset version, JSONL or Parquet."""
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or directory")
    if path.is_dir():
        manifest_path = path / "manifest.json"
        if not manifest_path.is_file():
            raise InputError(f"{path}: a directory without manifest.json is not a dataset version")
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
            files = [path / s["path"] for s in manifest["shards"] if s.get("kind") == "text"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise InputError(f"{manifest_path}: corrupt manifest ({e})") from None
        tables = [pq.read_table(f) for f in files]
        table = pa.concat_tables(tables) if tables else pa.table({"id": [], "text": []})
    elif path.suffix in (".jsonl", ".ndjson", ".json"):
        table = _read_jsonl(path)
    elif path.suffix == ".parquet":
        try:
            table = pq.read_table(path)
        except (OSError, pa.ArrowException) as e:
            raise InputError(f"{path}: unreadable Parquet ({e})") from None
    else:
        raise InputError(f"{path}: expected a dataset directory, .jsonl or .parquet file")
    for column in ("id", "text"):
        if column not in table.column_names:
            raise InputError(f"{path}: no '{column}' column (records need 'id' and 'text')")
    if table.num_rows and table.column("id").null_count:
        row = pc.index(pc.is_null(table.column("id")), True).as_py()
        raise InputError(f"{path}: record {row + 1} has no id")
    text_type = table.schema.field("text").type
    if table.num_rows and not (
        pa.types.is_string(text_type) or pa.types.is_large_string(text_type)
    ):
        raise InputError(f"{path}: column 'text' must hold strings, not {text_type}")
    return table


def dedup(
    input: Annotated[Path, typer.Argument(help="Dataset version dir, or .jsonl/.parquet file.")],
    out: Annotated[Path, typer.Option("--out", help="Output directory.")],
    against: Annotated[
        str | None,
        typer.Option(help="Index of earlier documents: a directory, or redis://host:port/db."),
    ] = None,
    commit_as: Annotated[
        str | None, typer.Option(help="Add the kept records to the index under this run id.")
    ] = None,
    threshold: Annotated[
        float | None,
        typer.Option(help="Estimated Jaccard for near-duplicates (default ~0.72).", min=0, max=1),
    ] = None,
) -> None:
    """Drop exact and near-duplicate records; write DIR/kept.parquet and DIR/rejected.parquet."""
    try:
        _dedup(input, out, against, commit_as, threshold)
    except (InputError, DedupIndexError, FileNotFoundError) as e:
        _fail(str(e))


def _dedup(
    input: Path, out: Path, against: str | None, commit_as: str | None, threshold: float | None
) -> None:
    from shards.writer import atomic_write_table

    if commit_as and not against:
        raise InputError("--commit-as needs --against INDEX")
    settings = DedupSettings(threshold=threshold, index="none")
    index = None
    if against:
        local = not against.startswith(("redis://", "rediss://", "unix://"))
        if local and not commit_as and not (Path(against) / INDEX_MANIFEST).is_file():
            raise FileNotFoundError(
                f"{against}: no dedup index here (create one with --commit-as RUN_ID)"
            )
        index = open_index_spec(against, settings)
    table = read_input(input)
    ids = [str(x) for x in table.column("id").to_pylist()]
    seen: dict[str, int] = {}
    for row, i in enumerate(ids):
        if i in seen:
            raise InputError(f"{input}: id {i!r} appears twice (records {seen[i] + 1}, {row + 1})")
        seen[i] = row
    texts = [t or "" for t in table.column("text").to_pylist()]
    scores = (
        table.column("quality_score").to_pylist() if "quality_score" in table.column_names else None
    )
    verdicts = find_duplicates(ids, texts, scores, settings, index)
    keep = pa.array([v is None for v in verdicts], pa.bool_())
    kept = table.filter(keep)
    rejected = table.filter(pc.invert(keep))
    for name in ("reason", "duplicate_of"):
        if name in rejected.column_names:
            rejected = rejected.drop_columns([name])
    dropped = [v for v in verdicts if v is not None]
    rejected = rejected.append_column(
        "reason", pa.array([v.reason for v in dropped], pa.string())
    ).append_column("duplicate_of", pa.array([v.duplicate_of for v in dropped], pa.string()))
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_table(kept, out / "kept.parquet", root=out, kind="kept")
    atomic_write_table(rejected, out / "rejected.parquet", root=out, kind="rejected")
    counts = Counter(v.reason for v in dropped)
    summary = ", ".join(f"{k} {n}" for k, n in sorted(counts.items())) or "no duplicates"
    typer.echo(f"{len(ids)} records: kept {kept.num_rows}; {summary}", err=True)
    if index is not None and commit_as:
        kept_ids = [i for i, v in zip(ids, verdicts, strict=True) if v is None]
        kept_texts = [t for t, v in zip(texts, verdicts, strict=True) if v is None]
        entry_ids, sigs, exact = index_entries(kept_ids, kept_texts, settings)
        added = index.add(commit_as, entry_ids, sigs, exact)
        typer.echo(f"added {added} records to {against} as run {commit_as}", err=True)
    typer.echo(str(out))


@index_app.command("show")
def index_show(index: Annotated[str, typer.Argument(help="Index directory or Redis URL.")]) -> None:
    """List the runs in an index and how many documents each holds."""
    try:
        if (
            not index.startswith(("redis://", "rediss://", "unix://"))
            and not (Path(index) / INDEX_MANIFEST).is_file()
        ):
            raise FileNotFoundError(f"{index}: no dedup index here")
        idx = open_index_spec(index)
        for run_id, rows in sorted(idx.runs().items()):
            typer.echo(f"{run_id}\t{rows}")
    except (DedupIndexError, FileNotFoundError) as e:
        _fail(str(e))


@index_app.command("remove")
def index_remove(
    index: Annotated[str, typer.Argument(help="Index directory or Redis URL.")],
    run_id: Annotated[str, typer.Argument(help="Run whose documents to remove.")],
) -> None:
    """Remove one run's documents from an index (e.g. after deleting its dataset version)."""
    try:
        removed = open_index_spec(index).remove_run(run_id)
    except DedupIndexError as e:
        _fail(str(e))
        return
    typer.echo(f"removed {removed} documents of run {run_id}", err=True)


# For tests and `python -m flows.cli_dedup`; flows/cli.py registers `dedup` and `index_app`.
app = typer.Typer(no_args_is_help=True, pretty_exceptions_enable=False)
app.command("dedup")(dedup)
app.add_typer(index_app, name="dedup-index")

if __name__ == "__main__":
    app()
