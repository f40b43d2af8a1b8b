"""`booksmith dedup` and `booksmith dedup-index`: dedup alone, on any corpus.

    booksmith dedup INPUT --out DIR [--against INDEX] [--commit-as RUN_ID] [--threshold J]

INPUT is a dataset version directory (its text shards) or a JSONL / Parquet file of records
with at least `id` and `text`; every other column is carried through untouched and ids are kept
verbatim. The input is read as a stream, a batch at a time (filters/dedup/stream.py), so a
corpus larger than memory is fine. Writes DIR/kept.parquet and DIR/rejected.parquet (the input
columns plus `reason` and `duplicate_of`). INDEX (a directory, or
redis://host:port/db?basename=NAME) is read only unless `--commit-as` names the run id under
which the kept records are then added.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import typer

from booksmith.filters.dedup import DedupIndexError, DedupSettings, open_index_spec
from booksmith.filters.dedup.engine import index_entries
from booksmith.filters.dedup.file_index import MANIFEST as INDEX_MANIFEST
from booksmith.filters.dedup.stream import DuplicateIdError, StreamVerdicts, decide
from booksmith.filters.inputs import InputError, iter_tables
from booksmith.flows.cli_errors import fail
from booksmith.shards.writer import commit

index_app = typer.Typer(help="Inspect or edit a persistent dedup index.", no_args_is_help=True)


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
        fail(str(e))
    except DuplicateIdError as e:
        fail(f"{input}: {e}")


def _dedup(
    input: Path, out: Path, against: str | None, commit_as: str | None, threshold: float | None
) -> None:
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
    verdicts = decide(lambda: iter_tables(input), settings, index, work=out.parent)
    out.mkdir(parents=True, exist_ok=True)
    kept_rows, counts = 0, Counter[str]()
    writers: dict[str, pq.ParquetWriter] = {}
    tmps = {name: out / f".{name}.parquet.tmp-{os.getpid()}" for name in ("kept", "rejected")}
    row = 0
    try:
        for table in iter_tables(input):  # pass 3: write each batch with its verdicts
            found = verdicts.batch(row, table.num_rows)
            row += table.num_rows
            keep = pa.array([v is None for v in found], pa.bool_())
            kept = table.filter(keep)
            rejected = table.filter(pc.invert(keep))
            rejected = rejected.drop_columns(
                [c for c in ("reason", "duplicate_of") if c in rejected.column_names]
            )
            dropped = [v for v in found if v is not None]
            rejected = rejected.append_column(
                "reason", pa.array([r for r, _ in dropped], pa.string())
            ).append_column("duplicate_of", pa.array([d for _, d in dropped], pa.string()))
            for name, part in (("kept", kept), ("rejected", rejected)):
                if name not in writers:
                    writers[name] = pq.ParquetWriter(tmps[name], part.schema, compression="zstd")
                writers[name].write_table(part.cast(writers[name].schema))
            kept_rows += kept.num_rows
            counts.update(r for r, _ in dropped)
        for name, writer in writers.items():
            writer.close()
            commit(tmps[name], out / f"{name}.parquet")
    finally:
        for tmp in tmps.values():
            tmp.unlink(missing_ok=True)
    summary = ", ".join(f"{k} {n}" for k, n in sorted(counts.items())) or "no duplicates"
    typer.echo(f"{row} records: kept {kept_rows}; {summary}", err=True)
    if index is not None and commit_as:
        added = _commit_kept(input, verdicts, settings, index, commit_as)
        typer.echo(f"added {added} records to {against} as run {commit_as}", err=True)
    typer.echo(str(out))


def _commit_kept(
    input: Path, verdicts: StreamVerdicts, settings: DedupSettings, index: Any, run_id: str
) -> int:
    """Add the kept records to the index under `run_id` (one run: one segment)."""
    ids: list[str] = []
    sigs: list[Any] = []
    exact: list[Any] = []
    row = 0
    for table in iter_tables(input):
        keep = [v is None for v in verdicts.batch(row, table.num_rows)]
        row += table.num_rows
        kept = table.filter(pa.array(keep, pa.bool_()))
        i, s, e = index_entries(
            [str(x) for x in kept.column("id").to_pylist()],
            [t or "" for t in kept.column("text").to_pylist()],
            settings,
        )
        ids += i
        sigs.append(s)
        exact.append(e)
    all_sigs = np.concatenate(sigs) if sigs else np.zeros((0, settings.params.num_perm), "u4")
    all_exact = np.concatenate(exact) if exact else np.zeros(0, np.uint64)
    return int(index.add(run_id, ids, all_sigs, all_exact))


@index_app.command("show")
def index_show(index: Annotated[str, typer.Argument(help="Index directory or Redis URL.")]) -> None:
    """List the runs in an index and how many documents each holds, then the entries a
    takedown flagged (kept: they still block the text)."""
    try:
        if (
            not index.startswith(("redis://", "rediss://", "unix://"))
            and not (Path(index) / INDEX_MANIFEST).is_file()
        ):
            raise FileNotFoundError(f"{index}: no dedup index here")
        idx = open_index_spec(index)
        for run_id, rows in sorted(idx.runs().items()):
            typer.echo(f"{run_id}\t{rows}")
        for doc_id, run_id in sorted(idx.taken_down().items()):
            typer.echo(f"taken down: {doc_id}\t{run_id}")
    except (DedupIndexError, FileNotFoundError) as e:
        fail(str(e))


@index_app.command("remove")
def index_remove(
    index: Annotated[str, typer.Argument(help="Index directory or Redis URL.")],
    run_id: Annotated[str, typer.Argument(help="Run whose documents to remove.")],
) -> None:
    """Remove one run's documents from an index (e.g. after deleting its dataset version)."""
    try:
        removed = open_index_spec(index).remove_run(run_id)
    except DedupIndexError as e:
        fail(str(e))
        return
    typer.echo(f"removed {removed} documents of run {run_id}", err=True)


# For tests and `python -m booksmith.flows.cli_dedup`; flows/cli.py registers `dedup`, `index_app`.
app = typer.Typer(no_args_is_help=True, pretty_exceptions_enable=False)
app.command("dedup")(dedup)
app.add_typer(index_app, name="dedup-index")

if __name__ == "__main__":
    app()
