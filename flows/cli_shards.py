"""`booksmith verify`, `booksmith export` and `booksmith datasets ...`: the shards' commands.

Registered on the main app by flows/cli.py; `python -m booksmith.flows.cli_shards` runs them alone.
Exit codes: 0 success, 1 a version that fails verification (each problem names its file),
2 a usage error (one line naming the file, key or URL).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from booksmith.flows.cli_errors import fail, one_line, user_errors
from booksmith.shards.version_dir import read_manifest

console = Console(stderr=True)
app = typer.Typer(help="Dataset versions: verify, export, list, retire, take down.")
datasets_app = typer.Typer(help="Dataset versions under an output directory.", no_args_is_help=True)
app.add_typer(datasets_app, name="datasets")


@app.command()
def verify(
    location: Annotated[str, typer.Argument(help="Version directory or URL (s3://, gs://...).")],
    sample: Annotated[int, typer.Option(help="Documents to round-trip per encoding.", min=0)] = 64,
) -> None:
    """Check a dataset version: schemas, row counts, sha256s, token round trip on a sample."""
    from booksmith.shards.fs import is_url
    from booksmith.shards.verify import verify as run_verify
    from booksmith.shards.version_dir import list_versions, not_a_version

    path = Path(location)
    if not is_url(location) and (not path.exists() or list_versions(path)):
        fail(not_a_version(path))  # missing, or an output root: say which and how (a version
        # without its manifest is verify's own finding, exit 1)
    try:
        report = run_verify(location, sample=sample)
    except user_errors(ValueError) as e:
        fail(f"{location}: {one_line(e)}")
        return
    for note in report.notes:
        console.print(f"note: {escape(note)}", highlight=False)
    if not report.ok:
        for problem in report.problems:
            console.print(f"[red]FAIL[/red] {escape(problem)}", highlight=False, soft_wrap=True)
        raise typer.Exit(1)
    print(f"ok: {location}: {report.shards_checked} files, {report.round_trips} round trips")


@app.command()
def export(
    version: Annotated[Path, typer.Argument(help="Dataset version directory.")],
    to: Annotated[str, typer.Option("--to", help="Destination root: s3://bucket/prefix, ...")],
    workers: Annotated[int, typer.Option(help="Parallel uploads.", min=1)] = 8,
    part_size_mb: Annotated[int, typer.Option(help="S3 multipart part size.", min=5)] = 64,
    check: Annotated[bool, typer.Option("--verify/--no-verify", help="Verify there.")] = True,
) -> None:
    """Copy a version to an object store (the URL becomes its root), manifest last;
    rerun to resume. AWS_ENDPOINT_URL and the other AWS variables configure S3."""
    from booksmith.shards.export import export as run_export
    from booksmith.shards.reachable import export_target
    from booksmith.shards.verify import verify as run_verify
    from booksmith.shards.version_dir import read_manifest

    try:
        read_manifest(version)  # a version, before anything is sent
        if problems := export_target(to, "--to"):
            fail("\n".join(problems))
        report = run_export(version, to, workers=workers, part_size=part_size_mb << 20)
        console.print(
            f"uploaded {len(report.uploaded)} files ({report.bytes_uploaded:,} bytes, "
            f"{report.parts_uploaded} parts, {report.parts_reused} parts resumed), "
            f"{len(report.skipped)} already there",
            highlight=False,
        )
        if check:
            result = run_verify(report.url)
            if not result.ok:
                for problem in result.problems:
                    console.print(f"[red]FAIL[/red] {escape(problem)}", highlight=False)
                raise typer.Exit(1)
    except user_errors(ValueError) as e:
        fail(f"{version} -> {to}: {one_line(e)}")
        return
    print(report.url)


def _local(location: str, command: str) -> Path:
    """An output directory a command changes in place: local only, one line otherwise."""
    from booksmith.shards.fs import is_url

    if is_url(location):
        fail(
            f"{location}: {command} changes versions in place, which booksmith does in a local "
            "output directory only; run it where the versions were written, then export again"
        )
    return Path(location)


@datasets_app.command("list")
def datasets_list(
    location: Annotated[
        str, typer.Argument(help="Output directory holding versions, or an export URL.")
    ],
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per line.")] = False,
) -> None:
    """List versions, oldest first, with documents, sizes and token counts."""
    from booksmith.shards.catalog import summarize, summarize_url
    from booksmith.shards.fs import is_url
    from booksmith.shards.version_dir import is_dataset

    out = Path(location)
    if is_url(location):
        try:
            rows = summarize_url(location)
        except user_errors(ValueError, OSError) as e:
            fail(f"{location}: {one_line(e)}")
    elif not out.is_dir():
        fail(f"{out}: no such directory")
    elif is_dataset(out):
        fail(f"{out} is a dataset version; datasets list takes the output directory that holds "
             f"versions, e.g. {out.parent}")  # fmt: skip
    else:
        rows = summarize(out)
    if not rows:  # not an error: a new output directory has none yet
        console.print(f"{escape(str(out))}: no dataset versions yet (`booksmith run --out "
                      f"{escape(str(out))}` makes one)", highlight=False)  # fmt: skip
        return
    if as_json:
        for row in rows:
            print(json.dumps(row.to_json()))
        return
    table = Table(title=location)
    table.add_column("run id", no_wrap=True)
    for col in ("documents", "rejected", "MB", "tokens"):
        table.add_column(col, justify="left" if col == "tokens" else "right")
    for r in rows:
        tokens = "\n".join(f"{k} {v:,}" for k, v in r.tokens.items())
        table.add_row(
            r.run_id,
            str(r.documents),
            str(r.rejected),
            f"{r.bytes / 1e6:.1f}",
            tokens,
        )
    Console().print(table)


@datasets_app.command("rm")
def datasets_rm(
    location: Annotated[str, typer.Argument(help="Output directory.")],
    run_id: Annotated[str, typer.Argument(help="The version to retire.")],
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Say what it would remove; change nothing.")
    ] = False,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    index: Annotated[
        str | None,
        typer.Option(
            help="MinHash index: a directory or redis://... (default: the one the version's "
            "config names)."
        ),
    ] = None,
) -> None:
    """Retire a version: its manifest, its files, and its MinHash index entries."""
    from booksmith.filters.dedup import open_as_built, remove_run
    from booksmith.flows.takedown import recorded_index
    from booksmith.schemas.redact import redact_url
    from booksmith.shards.catalog import retire

    out = _local(location, "datasets rm")
    try:
        m = read_manifest(out / run_id)  # a version, before asking
        spec = index or recorded_index(out, m.config)
        entries = f" and its entries in the MinHash index {redact_url(spec)}" if spec else ""
        console.print(f"version {out / run_id}: every file{entries}", highlight=False)
        if dry_run:
            return
        _confirm(yes, f"retire {run_id} from {out}?")
        retire(out, run_id)
        dropped = remove_run(open_as_built(spec), run_id) if spec else 0
    except user_errors(ValueError) as e:
        fail(one_line(e))
        return
    console.print(f"retired {run_id}; {dropped} MinHash index entries removed")


@datasets_app.command("takedown")
def datasets_takedown(
    location: Annotated[str, typer.Argument(help="Output directory.")],
    ids: Annotated[list[str] | None, typer.Argument(help="Document ids.")] = None,
    ids_file: Annotated[Path | None, typer.Option("--ids-file", help="One id per line.")] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="List every place it would touch; change nothing.")
    ] = False,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    index: Annotated[
        str | None,
        typer.Option(
            help="MinHash index whose entries to flag: a directory or redis://... "
            "(default: OUT/_state/minhash)."
        ),
    ] = None,
    source_ids: Annotated[
        list[str] | None,
        typer.Option(
            "--source-id",
            help="A source record's id: every document derived from it goes, and no later "
            "run plans from it (repeat for several).",
        ),
    ] = None,
    source: Annotated[
        str | None, typer.Option("--source", help="Only that source's records (its name).")
    ] = None,
) -> None:
    """Remove documents by id from every version (and their rejected near-duplicates), from
    the response cache (tombstoned: no later run asks for them again), flag their MinHash
    index entries, regenerate the affected reports and write the recorded `datasets bin`
    outputs and exports again; a log of each takedown is kept in _state/takedowns.jsonl.
    Exit 1 when a copy could not be reached (each is listed)."""
    from booksmith.flows.takedown import apply_takedown, describe, plan_takedown
    from booksmith.generation.source_state import record_taken_down

    out = _local(location, "datasets takedown")
    wanted = list(ids or [])
    try:
        if ids_file is not None:
            wanted += ids_file.read_text(encoding="utf-8").split()
        if not out.is_dir():
            raise FileNotFoundError(f"{out}: no such directory")
        records = [(source, i) for i in source_ids or []]
        if records:
            wanted += _derived(out, records)
            if not wanted:  # nothing published from them yet: later runs skip them all the same
                if not dry_run:
                    _confirm(yes, f"remember {len(records)} source records as taken down?")
                    record_taken_down(out, records)
                return
        if not wanted:
            raise ValueError("no document ids given (arguments, --ids-file or --source-id)")
        plan = plan_takedown(out, wanted, index)
        for line in describe(plan):
            console.print(escape(line), highlight=False, soft_wrap=True)
        if dry_run:
            print(json.dumps({"dry_run": True, **plan.to_json()}))
            return
        _confirm(yes, f"take {len(plan.drop)} documents down from {out}?")
        record_taken_down(out, records)  # first: a failure below must not let a run plan them
        result = apply_takedown(plan)
    except user_errors(ValueError) as e:
        fail(one_line(e))
        return
    for run_id, n in result.removed.items():
        console.print(f"{run_id}: removed {n} rows")
    print(json.dumps(result.to_json()))
    if result.unreached:
        fail("\n".join(f"not reached: {u}" for u in result.unreached), 1)


def _derived(out: Path, records: list[tuple[str | None, str]]) -> list[str]:
    """The documents derived from these source records, in every version and set-aside run."""
    from booksmith.shards.catalog import ids_from_sources
    from booksmith.shards.version_dir import FAILED_DIR, state_dir

    ids = ids_from_sources(out, records) + ids_from_sources(state_dir(out) / FAILED_DIR, records)
    names = ", ".join(f"{s}:{i}" if s else i for s, i in records)
    console.print(f"source records {names}: {len(ids)} derived documents", highlight=False)
    return ids


def _confirm(yes: bool, question: str) -> None:
    """Ask before changing anything, unless --yes; with no terminal to ask, say so and stop."""
    if yes:
        return
    if not sys.stdin.isatty():
        fail(f"{question} No terminal to ask: pass --yes to go ahead (or --dry-run to look)")
    if not typer.confirm(question):
        fail("nothing changed", 1)


@datasets_app.command("corpus")
def datasets_corpus(
    location: Annotated[
        str, typer.Argument(help="Output directory, or an export URL (s3://bucket/prefix).")
    ],
    version: Annotated[
        list[str] | None, typer.Option("--version", help="Run ids (default: every version).")
    ] = None,
    encoding: Annotated[str, typer.Option(help="Token encoding.")] = "cl100k_base",
) -> None:
    """Print (JSON) the token shards of the chosen versions, unioned for training."""
    from booksmith.shards.catalog import corpus
    from booksmith.shards.fs import is_url
    from booksmith.shards.version_dir import is_dataset

    out = Path(location)
    if not is_url(location) and not out.is_dir():
        fail(f"{out}: no such directory")
    if not is_url(location) and is_dataset(out):
        fail(f"{out} is a dataset version; datasets corpus takes the output directory that "
             f"holds versions, e.g. {out.parent} --version {out.name}")  # fmt: skip
    try:
        view = corpus(location, encoding, version or None)
    except user_errors(ValueError, OSError) as e:
        message = one_line(e)  # an S3 error may not say where: the URL, once
        fail(message if location in message else f"{location}: {message}")
        return
    print(json.dumps(view.to_json(), indent=2))


@datasets_app.command("tokenize")
def datasets_tokenize(
    input: Annotated[
        Path,
        typer.Argument(
            help="A dataset version, or records: the output of `booksmith filter` or "
            "`booksmith dedup` (its directory or kept.parquet), any {id, text} JSONL/Parquet."
        ),
    ],
    out: Annotated[
        Path | None,
        typer.Option(help="Write token shards here (for `train --data DIR`), not into INPUT."),
    ] = None,
    encoding: Annotated[
        str | None,
        typer.Option(help="Encoding name (e.g. smollm2, o200k_base); with --out: cl100k_base."),
    ] = None,
    bpe_file: Annotated[Path | None, typer.Option(help="The encoding's .tiktoken file.")] = None,
    sha256: Annotated[str | None, typer.Option(help="Expected sha256 of --bpe-file.")] = None,
    pack: Annotated[int | None, typer.Option(help="Also write packed rows of N+1.", min=1)] = None,
) -> None:
    """Add token shards under one more encoding to an existing version; with --out, write the
    token shards of any corpus (a version, or `filter`/`dedup` output) to DIR for training."""
    from booksmith.flows.cli_tokenize import tokenize_records
    from booksmith.shards.dataset import add_encoding
    from booksmith.shards.encodings import PRIMARY, EncodingSpec
    from booksmith.shards.version_dir import is_dataset

    try:
        if out is not None:
            spec = EncodingSpec(encoding or PRIMARY, bpe_file, sha256)
            entry = tokenize_records(input, out, spec, pack_seq_len=pack)
            console.print(
                f"{entry['documents']:,} documents, {entry['stored_tokens']:,} tokens "
                f"({spec.name}) in {out / entry['path']}; train with: booksmith train --data "
                f"{out} --config tiny --out runs/NAME",
                highlight=False,
            )
            print(out)
            return
        if not is_dataset(input):
            raise ValueError(
                f"{input}: not a dataset version; write its token shards to a directory with "
                "--out DIR (then: booksmith train --data DIR)"
            )
        if encoding is None:
            raise ValueError(
                f"{input}: name the encoding to add to this version with --encoding NAME, or "
                "write token shards elsewhere with --out DIR"
            )
        manifest = add_encoding(input, EncodingSpec(encoding, bpe_file, sha256), pack_seq_len=pack)
    except user_errors(ValueError) as e:
        fail(one_line(e))
        return
    print(json.dumps({k: v.model_dump(exclude_none=True) for k, v in manifest.tokens.items()}))


@datasets_app.command("bin")
def datasets_bin(
    version: Annotated[Path, typer.Argument(help="Dataset version directory.")],
    out: Annotated[Path, typer.Option("--out", help="Directory for the .bin files.")],
    encoding: Annotated[str, typer.Option(help="A uint16 encoding.")] = "smollm2",
    fmt: Annotated[str, typer.Option("--format", help="llmc (with header) or nanogpt.")] = "llmc",
    shard_tokens: Annotated[int, typer.Option(help="Tokens per llmc shard.", min=1)] = 100_000_000,
) -> None:
    """Write the token stream as uint16 .bin files for nanoGPT or llm.c."""
    from booksmith.shards.binexport import export_bin

    try:
        if fmt not in ("llmc", "nanogpt"):
            raise ValueError(f"--format: expected llmc or nanogpt, got {fmt!r}")
        paths = export_bin(
            version,
            out,
            encoding=encoding,
            fmt=fmt,  # type: ignore[arg-type]
            shard_tokens=shard_tokens,
        )
    except user_errors(ValueError) as e:
        fail(one_line(e))
        return
    for path in paths:
        print(path)


if __name__ == "__main__":
    app(prog_name="booksmith")
