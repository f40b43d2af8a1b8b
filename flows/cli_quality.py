"""`booksmith quality annotate|train` and `booksmith filter`: the quality stage's commands
(flows/cli.py registers them).

The stage functions behind them (`run_annotate`, `run_train`, `retrain_due`) live in
filters/retrain.py, where the nightly flow calls them too.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table

from booksmith.filters.retrain import run_annotate, run_train, settings_of
from booksmith.flows.cli_errors import fail, user_errors

if TYPE_CHECKING:
    pass

quality_app = typer.Typer(
    help="The educational-value classifier: annotate with an LLM judge, train fastText.",
    no_args_is_help=True,
)
console = Console(stderr=True)


def _split(values: list[str] | None) -> list[str]:
    return [v.strip() for value in values or [] for v in value.split(",") if v.strip()]


# -- commands -------------------------------------------------------------------------------------


@quality_app.command("annotate")
def annotate_command(
    dataset: Annotated[
        Path, typer.Argument(help="A dataset version, or JSONL/Parquet {id, text}.")
    ],
    config: Annotated[Path | None, typer.Option(help="YAML config (the judge's backend).")] = None,
    sample: Annotated[
        int | None, typer.Option(help="Documents to judge (default from config).", min=1)
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(help="Annotations file (default <out>/_state/quality/annotations.parquet)."),
    ] = None,
    max_tokens: Annotated[int | None, typer.Option(help="Judge reply cap.", min=1)] = None,
) -> None:
    """Score a sample of documents for educational value (0-5) with an LLM judge."""
    from booksmith.flows.prefect_env import configure_prefect

    configure_prefect(quiet=True)
    try:
        target, summary = run_annotate(
            dataset, config, sample=sample, annotations=out, max_tokens=max_tokens
        )
    except user_errors() as e:
        fail(str(e))
        return
    table = Table(title="annotate", show_header=False)
    for key, value in summary.items():
        table.add_row(key, str(value))
    console.print(table)
    print(target)


@quality_app.command("train")
def train_command(
    config: Annotated[Path | None, typer.Option(help="YAML config (filters.quality).")] = None,
    annotations: Annotated[
        Path | None,
        typer.Option(help="Judged documents: Parquet/JSONL with text and score."),
    ] = None,
    model_dir: Annotated[
        Path | None, typer.Option(help="Where to save (default <out>/_state/quality/).")
    ] = None,
) -> None:
    """Train the fastText classifier; print held-out precision, recall and F1."""
    try:
        report = run_train(config, annotations=annotations, model_dir=model_dir)
    except user_errors() as e:
        fail(str(e))
        return
    table = Table(title="quality classifier")
    for col in ("split", "n", "positives", "precision", "recall", "f1", "accuracy"):
        table.add_column(col)
    for name, m in (("held-out", report.holdout), ("train", report.train)):
        row = [m.n, m.positives, m.precision, m.recall, m.f1, m.accuracy]
        table.add_row(name, *map(str, row))
    console.print(table)
    console.print(f"model: {report.card['model']['bytes']:,} bytes")
    print(report.model_path)


def filter_command(
    input: Annotated[Path, typer.Argument(help="A dataset version, or JSONL/Parquet {id, text}.")],
    out: Annotated[Path, typer.Option(help="Writes kept.parquet, rejected.parquet, counts.json.")],
    config: Annotated[Path | None, typer.Option(help="YAML config (filters.*).")] = None,
    benchmarks: Annotated[
        list[str] | None,
        typer.Option(help="Benchmark file (JSONL/Parquet/CSV; NAME=PATH); repeat or comma-list."),
    ] = None,
    benchmark_fields: Annotated[
        list[str] | None,
        typer.Option(help="Benchmark text columns (default: question, prompt, text, ...)."),
    ] = None,
    quality_model: Annotated[
        Path | None, typer.Option(help="fastText quality model (default: the trained one).")
    ] = None,
    langid: Annotated[bool, typer.Option(help="Run language id.")] = True,
) -> None:
    """Run the quality filter chain alone and write kept and rejected records with reasons."""
    from booksmith.filters.base import run_chain
    from booksmith.filters.chain import build_chain
    from booksmith.filters.inputs import iter_batches
    from booksmith.filters.records_io import OutputWriter
    from booksmith.shards.version_dir import is_dataset, state_dir

    try:
        cfg, fs = settings_of(config)
        decontam = fs.decontam.model_copy(
            update={
                "benchmarks": [*fs.decontam.benchmarks, *_split(benchmarks)],
                "fields": _split(benchmark_fields) or fs.decontam.fields,
            }
        )
        quality = fs.quality
        if quality_model is not None:
            quality = quality.model_copy(update={"model_path": quality_model})
        fs = fs.model_copy(
            update={
                "decontam": decontam,
                "quality": quality,
                "langid": fs.langid.model_copy(update={"enabled": fs.langid.enabled and langid}),
            }
        )
        # A trained model is picked up from a dataset version's _state only.
        state = state_dir(input.parent) if input.is_dir() and is_dataset(input) else None
        chain = build_chain(fs, state=state)
        with OutputWriter(out) as writer:  # a batch of documents at a time
            for docs, extras in iter_batches(input, cfg.output.encoding):
                writer.add(run_chain(docs, chain), docs, extras)
            counts = writer.close()
    except user_errors() as e:
        fail(str(e))
        return
    table = Table(title=f"filter {input}")
    table.add_column("reason")
    table.add_column("documents", justify="right")
    for reason, n in counts["by_reason"].items():
        table.add_row(reason, str(n))
    table.add_row("[bold]kept[/bold]", str(counts["kept"]))
    console.print(table)
    print(out)
