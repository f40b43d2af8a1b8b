"""The `booksmith` command line (typer + rich). Each command is thin: it validates its input,
runs a flow or a stage, and prints a summary; user errors end in one line and a non-zero exit."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
import yaml
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.tree import Tree

from booksmith.flows.cli_errors import (
    EXIT_CODES_HELP,
    EXIT_ENDPOINT_FAILING,
    EXIT_NOT_PUBLISHED,
    fail,
    one_line,
    user_errors,
)
from booksmith.flows.prefect_env import configure_prefect

if TYPE_CHECKING:
    from booksmith.schemas.config import RunConfig

app = typer.Typer(
    help=f"booksmith: synthetic textbook-quality pretraining data. {EXIT_CODES_HELP}",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


@app.callback()
def _options(
    debug: Annotated[
        bool, typer.Option("--debug", help="Show the traceback behind an error line.")
    ] = False,
) -> None:
    if debug:
        os.environ["BOOKSMITH_DEBUG"] = "1"  # seen by fail() and by subprocesses


config_app = typer.Typer(help="Inspect the configuration.", no_args_is_help=True)
topics_app = typer.Typer(help="Topic seed files.", no_args_is_help=True)
app.add_typer(config_app, name="config")
app.add_typer(topics_app, name="topics")

console = Console(stderr=True)


class _GenerationProgress:
    """Requests done of total, completion tokens/s and failures, fed by generation events."""

    def __init__(self) -> None:
        self.progress = Progress(
            TextColumn("[bold]generating"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]:>7.1f} tok/s  failures {task.fields[failed]}"),
            TimeElapsedColumn(),
            console=console,
            transient=False,
        )
        self.task = self.progress.add_task("generate", total=None, rate=0.0, failed=0)
        self.parts: dict[tuple[str, int], Any] = {}
        self.done = {"completed": 0, "failed": 0}

    def __call__(self, event: str, data: dict[str, Any]) -> None:
        if event == "estimate":  # above the bar: what the run will cost, before it starts
            self.progress.console.print(escape(data["line"]), highlight=False, soft_wrap=True)
        elif event == "warning":
            line = f"[yellow]warning:[/yellow] {escape(data['line'])}"
            self.progress.console.print(line, highlight=False, soft_wrap=True)
        elif event == "plan":
            self.progress.update(self.task, total=data["total"])
        elif event == "generation":
            # Partitions report separately: sum the latest of each, plus finished chunks.
            report = data["report"]
            self.parts[(data.get("part", ""), id(report))] = report
            self._show()
        elif event == "generated":  # a chunk is done: keep its sums, drop its reports
            report = data["report"]
            self.done["completed"] += (
                report.completed + report.failed + report.skipped_budget + report.skipped_breaker
            )
            self.done["failed"] += report.failed
            self.parts.clear()
            self._show()

    def _show(self) -> None:
        reports = self.parts.values()
        self.progress.update(
            self.task,
            completed=self.done["completed"]
            + sum(r.completed + r.failed + r.skipped_budget + r.skipped_breaker for r in reports),
            rate=sum(r.completion_tokens_per_s_live() for r in reports),
            failed=self.done["failed"] + sum(r.failed for r in reports),
        )


# The options `run` and `plan` share: the same options plan the same requests.
ConfigOption = Annotated[Path | None, typer.Option(help="YAML config file.")]
TopicsOption = Annotated[Path | None, typer.Option(help="Topic seeds (YAML, JSONL or CSV).")]
OutOption = Annotated[Path | None, typer.Option(help="Output directory of dataset versions.")]
LimitOption = Annotated[int | None, typer.Option(help="Cap the number of requests.", min=1)]
SeedOption = Annotated[int | None, typer.Option(help="Run seed (default: from today's date).")]
SourcesOption = Annotated[
    list[str] | None,
    typer.Option(
        help="Records to ground generation in: a JSONL or Parquet file or folder of {id, text, "
        "license?}, or a dataset version; local or s3://. Repeat for several; they replace the "
        "config's sources:. Alone, the run plans from them only; with --topics, both by their "
        "shares."
    ),
]


def _run_config(
    config: Path | None, topics: Path | None, out: Path | None, limit: int | None,
    seed: int | None, sources: list[str] | None = None,
) -> RunConfig:  # fmt: skip
    from booksmith.flows.nightly import resolve_config

    return resolve_config(
        str(config) if config else None,
        str(topics) if topics else None,
        str(out) if out else None,
        limit,
        seed,
        sources,
    )


def _check_inputs(cfg: RunConfig) -> None:
    """The topic file and every source are readable: bad input fails before Prefect starts."""
    from booksmith.filters.sources import Source
    from booksmith.generation.seeds import load_seeds

    if cfg.plans_topics:
        load_seeds(cfg.topics)
    for spec in cfg.sources:
        Source(spec).files()


@app.command()
def run(
    config: ConfigOption = None,
    topics: TopicsOption = None,
    out: OutOption = None,
    limit: LimitOption = None,
    seed: SeedOption = None,
    sources: SourcesOption = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show Prefect's logs.")] = False,
) -> None:
    """Run the nightly flow once: plan, generate, filter, write a dataset version."""
    configure_prefect(quiet=not verbose)
    from booksmith.generation import preflight, progress
    from booksmith.generation.breaker import EndpointFailing
    from booksmith.pipeline.publish import RunNotPublished
    from booksmith.shards.version_dir import read_manifest

    try:
        # Validate before starting Prefect, so bad input fails fast and writes nothing.
        cfg = _run_config(config, topics, out, limit, seed, sources)
        _check_inputs(cfg)
        preflight.check(cfg)  # every problem at once, in seconds, before Prefect starts
        from booksmith.flows.nightly import nightly
        from booksmith.flows.task_runners import with_runner

        if not verbose:  # the CLI says why a run failed, in one line: no traceback from Prefect
            for name in ("prefect.flow_runs", "prefect.task_runs"):
                logging.getLogger(name).setLevel(logging.CRITICAL)

        bar = _GenerationProgress()
        unsubscribe = progress.subscribe(bar)
        try:
            with bar.progress:
                version_dir = with_runner(nightly, cfg)(
                    config=str(config) if config else None,
                    topics=str(topics) if topics else None,
                    out=str(out) if out else None,
                    limit=limit,
                    seed=seed,
                    sources=sources,
                )
        finally:
            unsubscribe()
    except user_errors() as e:
        fail(str(e))
        return
    except EndpointFailing as e:
        fail(str(e), EXIT_ENDPOINT_FAILING)
        return
    except RunNotPublished as e:
        fail(str(e), EXIT_NOT_PUBLISHED)
        return
    manifest = read_manifest(Path(version_dir))
    gen = manifest.counts.generate
    table = Table(title=f"run {manifest.run_id}", show_header=False)
    rows = [
        ("requests planned", gen.planned),
        ("documents kept", manifest.documents),
        ("rejected", manifest.counts.rejected),
        ("failures", gen.failed),
        ("from cache", gen.cached),
        ("skipped (budget)", gen.skipped_budget),
        ("prompt tokens", gen.prompt_tokens),
        ("completion tokens", gen.completion_tokens),
        ("cost (USD)", f"{gen.cost_usd:.4f}"),
        ("output", version_dir),
    ]
    for key, value in rows:
        table.add_row(key, str(value))
    console.print(table)
    print(version_dir)  # stdout: the run directory, for scripts


@app.command()
def plan(
    config: ConfigOption = None,
    topics: TopicsOption = None,
    out: OutOption = None,
    limit: LimitOption = None,
    seed: SeedOption = None,
    sources: SourcesOption = None,
    write: Annotated[
        Path | None, typer.Option("--write", "-o", help="Write the plan to this Parquet file.")
    ] = None,
    show: Annotated[int, typer.Option(help="Print this many planned prompts.", min=0)] = 1,
) -> None:
    """Plan a run without generating: the requests `booksmith run` with the same options would
    make first (before any fill round), how the axes are spread, and optionally the plan itself
    as Parquet (plan.parquet's schema)."""
    from collections import Counter
    from datetime import UTC, datetime

    from booksmith.flows.nightly import make_plan, run_topics, seed_for
    from booksmith.generation.estimate import estimate
    from booksmith.schemas import GenerationRequest
    from booksmith.schemas.arrow import to_table
    from booksmith.shards.dataset import SingleFileWriter

    try:
        cfg = _run_config(config, topics, out, limit, seed, sources)
        run_seed = cfg.seed if cfg.seed is not None else seed_for(datetime.now(UTC).date())
        seeds, selection = run_topics(cfg)  # as the run plans
        requests = make_plan(
            seeds, cfg, run_seed, samples_per_topic=cfg.plan.samples_per_topic,
            limit=cfg.plan.limit,
        )  # fmt: skip
    except user_errors() as e:
        fail(str(e))
        return
    table = Table(title=f"plan, seed {run_seed}", show_header=False)
    prompts = [r.prompt for r in requests]
    rows = [
        ("topics", f"{len(seeds)} ({selection.get('rotation') or 'all'})"),
        ("requests", len(requests)),
        ("distinct prompts", len(set(prompts))),
        ("prompt characters (mean)", f"{sum(map(len, prompts)) / max(1, len(prompts)):.0f}"),
    ]
    est = estimate(requests, cfg, len(seeds))
    cost = "no price for this model (generation.prices)"
    if est.cost_expected is not None:
        cost = f"${est.cost_expected:,.2f} expected, ${est.cost_max:,.2f} at most"
    rows += [
        ("prompt tokens", f"{est.prompt_tokens:,}"),
        ("completion tokens", f"{est.completion_tokens_expected:,} expected ({est.basis}), "
                              f"{est.completion_tokens_max:,} at most"),
        ("cost", cost),
    ]  # fmt: skip
    if est.max_requests and est.max_requests > est.requests:
        rows.append(("fill rounds", f"may plan up to {est.max_requests:,} requests in all"))
    for axis in ("audience", "style", "format"):
        counts = Counter(getattr(r, axis) for r in requests)
        rows.append((axis, ", ".join(f"{k} {n}" for k, n in counts.most_common())))
    for key, value in rows:
        table.add_row(key, str(value))
    console.print(table)
    if warning := _budget_warning(est, cfg):
        console.print(f"[yellow]warning:[/yellow] {escape(warning)}", highlight=False)
    for request in requests[:show]:
        console.print(f"[bold]{escape(request.topic)}[/bold] ({request.audience}, "
                      f"{request.style}, {request.format}):", highlight=False)  # fmt: skip
        console.print(escape(request.prompt), highlight=False, soft_wrap=True)
    if write is not None:
        path = write.resolve()
        # the version's own plan writer: byte for byte the plan.parquet the run will write
        plan_file = SingleFileWriter(path.parent, path.name, GenerationRequest, kind="plan")
        plan_file.write_table(to_table(requests, GenerationRequest))
        plan_file.close()
        print(path)  # stdout: the file, for scripts


@app.command()
def report(
    location: Annotated[
        str, typer.Argument(help="A dataset version: a directory, or an export URL.")
    ],
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            help="Where to write report.md and its plots (default: the version's report/; "
            "for a URL, ./report-<run id>).",
        ),
    ] = None,
) -> None:
    """Print a dataset version's counts and diversity, and write its report (markdown, plots)."""
    from booksmith.flows.report import VersionFiles, render_report
    from booksmith.shards.fs import is_url

    try:
        manifest = VersionFiles(location).manifest()
        if out is None and is_url(location):
            out = Path(f"report-{manifest.run_id}")  # an export is read, never written to
        path = render_report(location, out)
    except user_errors(ValueError, OSError) as e:
        fail(one_line(e))
        return
    div = manifest.diversity
    table = Table(title=f"dataset {manifest.run_id}", show_header=False)
    table.add_row("documents", str(manifest.documents))
    if div.documents:
        for key in ("distinct_1", "distinct_2", "distinct_3", "top_opener_share"):
            table.add_row(key, f"{getattr(div, key):.4f}")
        table.add_row("compression_ratio", f"{div.compression_ratio:.3f}")
        table.add_row("mean_pairwise_minhash", f"{div.mean_pairwise_minhash:.4f}")
        for axis, cov in div.axis_coverage.items():
            table.add_row(f"{axis} coverage", f"{cov.covered:.0%}  {cov.counts}")
    Console().print(table)
    console.print(f"report: {path}")


@config_app.command("show")
def config_show(
    config: Annotated[
        Path | None, typer.Argument(help="Config file (default: the defaults).")
    ] = None,
) -> None:
    """Print the full configuration with every default filled in."""
    from booksmith.schemas.config import ConfigError, load_config
    from booksmith.schemas.redact import redact_config

    try:
        cfg = load_config(config)
    except ConfigError as e:
        fail(str(e))
        return
    shown = redact_config(cfg.model_dump(mode="json"))  # a passworded URL shows as ***
    print(yaml.safe_dump(shown, sort_keys=False), end="")


def _budget_warning(est: Any, cfg: RunConfig) -> str | None:
    """The over-budget line for a preview (a preview never refuses: it spends nothing)."""
    from booksmith.generation.estimate import OverBudget, check_budget

    try:
        return check_budget(est, cfg)
    except OverBudget as e:
        return f"{e} (generation.budget.over_estimate: refuse stops such a run before it starts)"


@topics_app.command("expand")
def topics_expand(
    topics: Annotated[list[str], typer.Argument(help="Seed topics to expand.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Topic file to write (JSONL).")],
    depth: Annotated[int, typer.Option(help="Levels of subtopics.", min=1, max=6)] = 2,
    breadth: Annotated[int, typer.Option(help="Subtopics per topic.", min=1, max=50)] = 8,
    config: Annotated[Path | None, typer.Option(help="YAML config (backend, budget).")] = None,
    existing: Annotated[
        Path | None, typer.Option(help="A topic file whose topics must not be repeated.")
    ] = None,
    leaves_only: Annotated[bool, typer.Option(help="Write only the leaves of the tree.")] = False,
    seed: Annotated[
        int, typer.Option(help="Sampling seed of every request: a rerun repeats the tree.")
    ] = 0,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show Prefect's logs.")] = False,
) -> None:
    """Expand seed topics into a topic tree with the LLM; writes a file `booksmith run` reads."""
    configure_prefect(quiet=not verbose)
    from booksmith.generation import preflight
    from booksmith.generation.seeds import load_seeds
    from booksmith.schemas.config import load_config

    try:
        cfg = load_config(config)
        if existing:
            load_seeds(existing)
        preflight.check_expand(cfg, output)  # every problem at once, before Prefect starts
        from booksmith.flows.expand import expand_topics

        counts = expand_topics(
            topics=topics,
            output=str(output),
            depth=depth,
            breadth=breadth,
            config=str(config) if config else None,
            existing=str(existing) if existing else None,
            leaves_only=leaves_only,
            seed=seed,
        )
    except user_errors() as e:
        fail(str(e))
        return
    per_root = counts.pop("per_root", {})
    table = Table(title=f"topics expanded into {output}", show_header=False)
    for key, value in counts.items():
        table.add_row(key, str(value))
    console.print(table)
    roots = Table(title="per root")
    roots.add_column("root")
    roots.add_column("children", justify="right")
    roots.add_column("children with >= 2", justify="right")
    for root, n in per_root.items():
        with_2 = f"{n['children_with_2']}/{n['children']}" if depth > 1 else "-"
        roots.add_row(root, str(n["children"]), with_2)
    console.print(roots)


@topics_app.command("show")
def topics_show(file: Annotated[Path, typer.Argument(help="Topic seed file.")]) -> None:
    """Print the topics of a seed file as a tree."""
    from booksmith.generation.seeds import SeedFileError, load_seeds

    try:
        seeds = load_seeds(file)
    except SeedFileError as e:
        fail(str(e))
        return
    root = Tree(str(file))
    nodes: dict[tuple[str, ...], Tree] = {}
    for s in seeds:
        parent: Tree = root
        key: tuple[str, ...] = ()
        for part in s.topic_path:
            key = (*key, part)
            if key not in nodes:
                nodes[key] = parent.add(part)
            parent = nodes[key]
    Console().print(root)
    console.print(f"{len(seeds)} topics")


@app.command()
def serve(
    config: Annotated[Path | None, typer.Option(help="YAML config the nightly runs use.")] = None,
    schedule: Annotated[
        bool, typer.Option("--schedule/--no-schedule", help="Run nightly on the config's cron.")
    ] = True,
    limit: Annotated[int | None, typer.Option(help="Flow runs at once.", min=1)] = None,
) -> None:
    """Serve the nightly, expand-topics, export and train deployments from this process (set
    PREFECT_API_URL to a Prefect server to see them in its UI)."""
    configure_prefect()
    from booksmith.schemas.config import load_config

    try:
        cfg = load_config(config)
    except user_errors() as e:
        fail(str(e))
        return
    from booksmith.flows.serve import serve as serve_deployments

    serve_deployments(config, cfg, schedule=schedule, limit=limit)


batches_app = typer.Typer(help="OpenAI Batch API jobs (generation.backend: batch).")
app.add_typer(batches_app, name="batches")


@batches_app.command("list")
def batches_list(
    config: Annotated[Path | None, typer.Option(help="YAML config file.")] = None,
    out: Annotated[Path | None, typer.Option(help="Output directory.")] = None,
) -> None:
    """Every batch file and job this output directory has made, with its state."""
    from booksmith.flows.nightly import resolve_config
    from booksmith.generation.batch import list_batches
    from booksmith.shards.version_dir import state_dir

    try:
        cfg = resolve_config(str(config) if config else None, out=str(out) if out else None)
    except user_errors() as e:
        fail(str(e))
        return
    folder = cfg.generation.batch.state_dir or state_dir(cfg.output.dir) / "batches"
    table = Table("file", "run", "requests", "state", "batch", "status")
    for r in list_batches(folder):
        table.add_row(Path(r.path).name, r.run_id, str(r.n_requests), r.state, r.batch_id or "-",
                      r.status or "-")  # fmt: skip
    Console().print(table)


def _register_stage_commands() -> None:
    """Each stage's commands live beside it in flows/cli_<stage>.py."""
    from booksmith.flows import cli_dedup, cli_quality, cli_shards, cli_train, cli_view

    app.command("dedup")(cli_dedup.dedup)
    app.add_typer(cli_dedup.index_app, name="dedup-index")
    app.command("filter")(cli_quality.filter_command)
    app.add_typer(cli_quality.quality_app, name="quality")
    app.command("verify")(cli_shards.verify)
    app.command("export")(cli_shards.export)
    app.add_typer(cli_shards.datasets_app, name="datasets")
    app.add_typer(cli_train.app, name="train")
    app.command("view")(cli_view.view)


_register_stage_commands()


def main() -> None:
    from booksmith.flows.malloc import tune_allocators

    tune_allocators()  # before any thread starts: see flows/malloc.py
    app(prog_name="booksmith")


if __name__ == "__main__":
    main()
