"""`booksmith quality annotate|train` and `booksmith filter`: the quality stage's commands.

Register in flows/cli.py:
    from booksmith.flows import cli_quality
    app.add_typer(cli_quality.quality_app, name="quality")
    app.command("filter")(cli_quality.filter_command)

`run_annotate` and `run_train` are plain functions, so the nightly flow can re-annotate and
retrain on the schedule in `filters.quality.retrain_every_days` (see `retrain_due`).
"""

from __future__ import annotations

import json
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

if TYPE_CHECKING:
    from booksmith.filters.settings import FilterSettings
    from booksmith.schemas.config import GenerationSettings, RunConfig

quality_app = typer.Typer(
    help="The educational-value classifier: annotate with an LLM judge, train fastText.",
    no_args_is_help=True,
)
console = Console(stderr=True)

ANNOTATIONS = Path("quality") / "annotations.parquet"
MODEL_DIR = Path("quality")


def _fail(message: str) -> None:
    console.print(f"[red]error:[/red] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


def _user_errors() -> tuple[type[Exception], ...]:
    from booksmith.filters.settings import FilterError
    from booksmith.generation.backends import BackendError
    from booksmith.schemas.config import ConfigError

    return (FilterError, ConfigError, BackendError, FileNotFoundError)


def _settings(config: Path | RunConfig | None) -> tuple[RunConfig, FilterSettings]:
    """(RunConfig, FilterSettings): the config and its `filters:` section."""
    from booksmith.schemas.config import RunConfig, load_config

    cfg = config if isinstance(config, RunConfig) else load_config(config)
    return cfg, cfg.filters


def _state_for(path: Path, default_out: Path) -> Path:
    """`<out>/_state` of a dataset version (its parent's), else the configured output's."""
    from booksmith.shards.version import is_dataset, state_dir

    if path.is_dir() and is_dataset(path):
        return state_dir(path.parent)
    return state_dir(default_out)


def _split(values: list[str] | None) -> list[str]:
    return [v.strip() for value in values or [] for v in value.split(",") if v.strip()]


# -- stage functions (CLI and flows) --------------------------------------------------------------


def judge_settings(cfg: RunConfig) -> GenerationSettings:
    """The generation settings the judge runs on: `filters.annotate`'s endpoint when set."""
    a = cfg.filters.annotate
    if a.base_url is None:
        return cfg.generation
    return cfg.generation.model_copy(
        update={
            "backend": "openai",
            "base_url": a.base_url,
            "model": a.model or cfg.generation.model,
            "api_key_env": a.api_key_env or cfg.generation.api_key_env,
            "endpoints": [],
        }
    )


def run_annotate(
    dataset: Path,
    config: Path | RunConfig | None = None,
    *,
    sample: int | None = None,
    annotations: Path | None = None,
    max_tokens: int | None = None,
) -> tuple[Path, dict[str, Any]]:
    """Judge a sample of a dataset's documents; merge into the annotations file.
    Returns (annotations file, summary)."""
    from booksmith.filters.annotate import annotate, save_annotations
    from booksmith.filters.annotate import sample as take_sample
    from booksmith.filters.records_io import read_documents
    from booksmith.generation.backends import open_endpoint
    from booksmith.generation.cache import ResponseCache

    cfg, fs = _settings(config)
    docs = read_documents(dataset, cfg.output.encoding)
    docs = [d for d in docs if d.text.strip()]
    chosen = take_sample(docs, sample or fs.annotate.sample, fs.annotate.seed)
    state = _state_for(dataset, cfg.output.dir)
    target = annotations or state / ANNOTATIONS
    cache = ResponseCache(state / "responses.sqlite")
    try:
        with open_endpoint(judge_settings(cfg), cfg.embedded) as endpoint:
            judged, report = annotate(
                chosen,
                endpoint,
                cache=cache,
                budget=cfg.generation.budget,
                max_tokens=max_tokens or fs.annotate.max_tokens,
                max_chars=fs.annotate.max_chars,
            )
    finally:
        cache.close()
    total = save_annotations(target, judged)
    summary = {
        "documents": len(docs),
        "judged": len(judged),
        "scored": sum(a.score is not None for a in judged),
        "errors": dict(Counter(a.error for a in judged if a.error)),
        "scores": dict(sorted(Counter(a.score for a in judged if a.score is not None).items())),
        "from_cache": report.cached,
        "annotations_total": total,
        "judge": judged[0].judge if judged else "",
    }
    return target, summary


def run_train(
    config: Path | RunConfig | None = None,
    *,
    annotations: Path | None = None,
    model_dir: Path | None = None,
) -> Any:
    """Train the classifier on judged documents; returns the TrainReport."""
    import pyarrow.parquet as pq

    from booksmith.filters.annotate import RUBRIC
    from booksmith.filters.quality import train
    from booksmith.filters.records_io import read_labelled
    from booksmith.shards.version import state_dir

    cfg, fs = _settings(config)
    state = state_dir(cfg.output.dir)
    source = annotations or state / ANNOTATIONS
    data, _ = read_labelled(source)
    judge = ""
    if source.suffix == ".parquet" and "judge" in pq.read_schema(source).names:
        judges = sorted({j for j in pq.read_table(source, columns=["judge"])["judge"].to_pylist()})
        judge = ", ".join(j for j in judges if j)
    return train(
        data,
        model_dir or state / MODEL_DIR,
        fs.quality,
        source=str(source),
        judge=judge,
        rubric=RUBRIC if judge else "",
    )


def retrain_due(model_dir: Path, every_days: int | None, now: datetime | None = None) -> bool:
    """Whether the nightly flow should re-annotate and retrain (never when unscheduled)."""
    from booksmith.filters.quality import MODEL_FILE, card_path

    if every_days is None:
        return False
    card = card_path(model_dir / MODEL_FILE)
    if not card.is_file():
        return True
    try:
        created = datetime.fromisoformat(json.loads(card.read_text())["model"]["created_at"])
    except (ValueError, KeyError, TypeError):
        return True
    return (now or datetime.now(UTC)) - created >= timedelta(days=every_days)


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
    from booksmith.flows.runtime import configure_prefect

    configure_prefect(quiet=True)
    try:
        target, summary = run_annotate(
            dataset, config, sample=sample, annotations=out, max_tokens=max_tokens
        )
    except _user_errors() as e:
        _fail(str(e))
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
    except _user_errors() as e:
        _fail(str(e))
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
    from booksmith.filters.chain import build_chain
    from booksmith.filters.records_io import OutputWriter, iter_documents
    from booksmith.filters.scored import run_detailed
    from booksmith.shards.version import is_dataset, state_dir

    try:
        cfg, fs = _settings(config)
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
            for docs in iter_documents(input, cfg.output.encoding):
                writer.add(run_detailed(docs, chain), docs)
            counts = writer.close()
    except _user_errors() as e:
        _fail(str(e))
        return
    table = Table(title=f"filter {input}")
    table.add_column("reason")
    table.add_column("documents", justify="right")
    for reason, n in counts["by_reason"].items():
        table.add_row(reason, str(n))
    table.add_row("[bold]kept[/bold]", str(counts["kept"]))
    console.print(table)
    print(out)
