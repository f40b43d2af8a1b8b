"""The nightly flow: topics -> a stream of chunks (plan -> generate -> exact dedup -> quality
chain -> MinHash candidates, spilled) -> near-duplicate clusters decided -> dataset version ->
index commit -> report; then, when configured, retrain the quality classifier, export the version
and train on it.

A flow wires stages; the stages live in their packages and the chunk loop in pipeline/ (one
object per run, `StreamingRun`; the overlap of generation and filtering in pipeline/drive.py).
Tasks wrap stage calls and declare their retries here. Generation is idempotent (the durable
response cache under `<out>/_state/`), so its task can retry, and a killed run started again
re-requests nothing that finished. Its client runs in a process of its own unless the run is
on Dask (generation/process.py), so that it does not share an interpreter with the filters.
"""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any, TypeVar, cast
from uuid import UUID

import pyarrow.dataset as ds
import pyarrow.parquet as pq
from prefect import flow, get_run_logger, task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run
from prefect.utilities.annotations import quote

from booksmith.filters.dedup import open_index, reconcile
from booksmith.filters.retrain import MODEL_DIR, retrain_due, run_annotate, run_train
from booksmith.flows.expand import expand
from booksmith.flows.export import export_version
from booksmith.flows.report import SAMPLES_HEADING, render_report
from booksmith.flows.task_runners import dask_client
from booksmith.generation import preflight, progress
from booksmith.generation.backends import open_endpoints
from booksmith.generation.client import Endpoint, GenerationReport
from booksmith.generation.coverage import select_topics, topic_key
from booksmith.generation.estimate import Estimate, check_budget, estimate
from booksmith.generation.grow import add_grown, as_node, leaves_to_grow, with_grown
from booksmith.generation.plan import plan_for
from booksmith.generation.process import GenerationCall, GenerationProcess, generate_chunk
from booksmith.generation.scaleout import assign, merge_reports, partition, share_budget
from booksmith.generation.seeds import load_seeds
from booksmith.generation.source_state import record_planned, recorded, version_keys
from booksmith.pipeline.checkpoint import run_key
from booksmith.pipeline.chunks import Chunk, ChunkStats, add_report
from booksmith.pipeline.drive import run_rounds
from booksmith.pipeline.grounded import MixedPlan
from booksmith.pipeline.publish import RunNotPublished, publish_problem
from booksmith.pipeline.run import StreamingRun, completed_version, resumable_run
from booksmith.schemas import GenerationRequest, GenerationResult, TopicSeed
from booksmith.schemas.config import Budget, RunConfig, load_config
from booksmith.schemas.crashpoints import crash_point
from booksmith.schemas.manifest import Manifest
from booksmith.schemas.redact import redact_text
from booksmith.shards.files import DiskFull, disk_full
from booksmith.shards.version_dir import (
    claim_run_dir,
    release_run_dir,
    set_aside,
    state_dir,
    sweep_abandoned,
)


def seed_for(day: date) -> int:
    """A scheduled run's seed comes from its date, so each night plans new text."""
    return int(day.strftime("%Y%m%d"))


def resolve_config(
    config: str | None = None,
    topics: str | None = None,
    out: str | None = None,
    limit: int | None = None,
    seed: int | None = None,
    sources: list[str] | None = None,
) -> RunConfig:
    """The config file with the command line's flags on top (flags win; `--sources` replaces
    the config's sources, each with share 1)."""
    overrides: dict[str, Any] = {
        "topics": topics, "output.dir": out, "plan.limit": limit, "seed": seed,
        "sources": [{"path": p} for p in sources] if sources else None,
    }  # fmt: skip
    return load_config(Path(config) if config else None, overrides)


# Stage inputs are large (thousands of requests): hashing them for Prefect's cache would cost
# more than the stages, and the generation stage has its own durable cache. So: NO_CACHE.

T = TypeVar("T")


def _as_is(value: T) -> T:
    return value


def unvisited(value: T) -> T:
    """`value` as a task argument that Prefect hands over without walking it in search of
    futures (`quote`): its walk over a chunk's requests and answers, Python work under the GIL,
    took about a third of the flow process's samples in a 20,000-request run."""
    return cast(T, quote(value))


@task(cache_policy=NO_CACHE)
def load_topics(cfg: RunConfig, seed: int) -> tuple[list[TopicSeed], dict[str, Any], str]:
    """The seed file's topics, narrowed to this run's share when `plan.topics_per_run` is set,
    and the run's key (config, seed and every seed topic: what makes two runs the same)."""
    every = all_topics(cfg)
    seeds, selection = select_topics(every, cfg.plan, cfg.output.dir)
    return seeds, selection, run_key(cfg, seed, every)


def all_topics(cfg: RunConfig) -> list[TopicSeed]:
    """The seed file's topics and the tree grown so far; none for a run with sources and no
    topic file (it plans from the sources only)."""
    if not cfg.plans_topics:
        return []
    return with_grown(load_seeds(cfg.topics), cfg.output.dir)


def run_topics(cfg: RunConfig) -> tuple[list[TopicSeed], dict[str, Any]]:
    """This run's topics and the rotation's account, as `load_topics` picks them."""
    return select_topics(all_topics(cfg), cfg.plan, cfg.output.dir)


def announce_estimate(
    cfg: RunConfig, seeds: list[TopicSeed], seed: int
) -> tuple[Estimate, MixedPlan | None]:
    """The first round's tokens and dollars, logged and shown by the CLI before the first
    request; over the budget it warns, or raises OverBudget when the budget says refuse.
    With sources, also the run's grounded plan: the estimate's, to plan again without
    selecting passages again (each selection is a pass cutting the whole source)."""
    grounded = MixedPlan(cfg, seeds, seed) if cfg.sources else None
    est = estimate(first_round(cfg, seeds, seed, grounded), cfg, len(seeds))
    logger = get_run_logger()
    logger.info(est.line())
    progress.emit("estimate", line=est.line())
    if warning := check_budget(est, cfg):
        logger.warning(warning)
        progress.emit("warning", line=warning)
    return est, grounded.again() if grounded is not None else None


def first_round(
    cfg: RunConfig, seeds: list[TopicSeed], seed: int, grounded: MixedPlan | None = None
) -> Iterator[GenerationRequest]:
    """The first round's requests as a run plans them: topics, sources or both (with sources,
    `grounded`'s, else a new plan's)."""
    if cfg.sources:
        return (grounded or MixedPlan(cfg, seeds, seed)).requests()
    plan = cfg.plan
    return plan_for(cfg, seeds, seed, samples_per_topic=plan.samples_per_topic,
                    limit=plan.limit)  # fmt: skip


def make_plan(
    seeds: list[TopicSeed], cfg: RunConfig, seed: int, **kw: Any
) -> list[GenerationRequest]:
    """The requests for these topics under the run config (`booksmith plan`'s preview)."""
    if cfg.sources:
        return list(first_round(cfg, seeds, seed))
    return list(plan_for(cfg, seeds, seed, **kw))


@task(retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE)
def generate(call: GenerationCall, process: GenerationProcess | None = None) -> GenerationReport:
    """One partition of one chunk against one endpoint (a chunk has one partition unless
    `generation.partitions` or several endpoints ask for more); in the run's generation
    process when it has one."""
    if process is not None:
        return process.run(call)

    def on_result(result: GenerationResult, report: GenerationReport) -> None:
        progress.emit("generation", result=result, report=report, part=call.part)

    return generate_chunk(call, on_result)


class Generating:
    """A chunk's generation submitted to the flow's task runner, one task per partition.

    `generated`: what the run's generation has used so far, by the chunks answered before
    this one, filtered or not: the chunk's budget is what it leaves, its circuit breaker
    starts from its window, and `result` adds this chunk to it. (The filters' tally of the
    run lags a chunk: chunk k+1 starts before chunk k is filtered.) Its `limits` (by endpoint,
    where the adaptive limits ended so far) seed each call's client."""

    def __init__(
        self, chunk: Chunk, endpoints: list[Endpoint], cfg: RunConfig, run_id: str,
        generated: GenerationReport, process: GenerationProcess | None = None,
    ) -> None:  # fmt: skip
        self.generated = generated
        budget = remaining(cfg.generation.budget, generated)
        # One batch client per state directory: the Batch API backend runs as one partition.
        wanted = 1 if cfg.generation.backend == "batch" else cfg.generation.partitions
        parts = partition(chunk.plan, wanted or len(endpoints))
        shares = assign(parts, endpoints)
        each = share_budget(budget, len(parts))
        names = [f"part {k + 1}/{len(parts)}" if len(parts) > 1 else "" for k in range(len(parts))]
        history = list(generated.outcomes)
        calls = [
            GenerationCall(part, endpoint, cfg, run_id, each, name, history, dict(generated.limits))
            for part, endpoint, name in zip(parts, shares, names, strict=True)
        ]
        # Quoted for Prefect's own runner only: Dask's hands quoted arguments over as (field,
        # value) tuples, and ships the arguments to its workers by pickle anyway.
        wrap = unvisited if dask_client() is None else _as_is
        self.futures = [generate.submit(wrap(call), process) for call in calls]

    def result(self) -> GenerationReport:
        report = merge_reports([f.result() for f in self.futures])
        add_report(self.generated, report)  # its limits, outcomes and spending included
        progress.emit("generated", report=report)
        return report


def remaining(budget: Budget, spent: GenerationReport) -> Budget:
    """What the budget leaves after earlier chunks (None stays unlimited)."""
    tokens = spent.prompt_tokens + spent.completion_tokens
    return Budget(
        max_tokens=max(1, budget.max_tokens - tokens) if budget.max_tokens else None,
        max_cost_usd=max(1e-9, budget.max_cost_usd - spent.cost_usd)
        if budget.max_cost_usd
        else None,
    )


@task(cache_policy=NO_CACHE)
def sync_index(cfg: RunConfig) -> dict[str, Any]:
    """Index versions whose commit a crash cut off; with a file index, also drop entries of
    versions deleted by hand. (A shared Redis index serves other output directories too, so
    it is never pruned from here.)"""
    index = open_index(cfg.dedup, cfg.output.dir)
    if index is None:
        return {}
    try:
        done = reconcile(index, cfg.output.dir, cfg.dedup, prune=cfg.dedup.index == "file")
    finally:
        index.close()
    return {"added": done.added, "removed": done.removed}


@task(cache_policy=NO_CACHE)
def process_chunk(run: StreamingRun, chunk: Chunk, report: GenerationReport) -> ChunkStats:
    """Documents, exact dedup, the quality chain and the MinHash candidates of one chunk."""
    stats = run.process(chunk, report)
    get_run_logger().info(
        "chunk %d: %d requests, %d documents, %d failures, %d rejected, %d candidates",
        stats.number, stats.requests, stats.documents, stats.failures, stats.rejected,
        stats.candidates,
    )  # fmt: skip
    return stats


@task(retries=1, cache_policy=NO_CACHE)
def write_dataset(run: StreamingRun, selection: dict[str, Any]) -> Manifest:
    """Decide the near-duplicate clusters and write the version, manifest last."""
    manifest, _ = run.write({"plan": {"topics": selection}})
    return manifest


@task(retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE)
def commit_index(run: StreamingRun) -> int:
    """Add this run's documents to the MinHash index: only after its manifest exists, so a run
    killed before that never finds its own documents there when it is run again."""
    return run.commit_index()


@task(cache_policy=NO_CACHE)
def retrain_quality(cfg: RunConfig, version_dir: Path) -> dict[str, Any]:
    """Re-annotate a sample of the new version with the judge and retrain the classifier when
    `filters.quality.retrain_every_days` says it is due; the next run filters with the new
    model. A failure here is logged, not raised: the version is already written."""
    every = cfg.filters.quality.retrain_every_days
    if not retrain_due(state_dir(cfg.output.dir) / MODEL_DIR, every):
        return {"retrained": False}
    logger = get_run_logger()
    try:
        _, annotated = run_annotate(version_dir, cfg)
        trained = run_train(cfg)
    except Exception as e:  # e.g. a judge that gave only one class of scores
        logger.warning("quality classifier not retrained: %s", e)
        return {"retrained": False, "error": str(e)}
    metrics = trained.card.get("metrics", {})
    logger.info("quality classifier retrained on %s judged documents: %s", annotated, metrics)
    return {"retrained": True, "annotated": annotated, "model": str(trained.model_path)}


@task(cache_policy=NO_CACHE)
def grow_tree(cfg: RunConfig, version_dir: Path, run_id: str) -> dict[str, Any]:
    """Expand the leaves whose documents fared best in this version; the next run plans
    from their new children too (generation/grow.py). A failure here is logged, not raised:
    the version is already written."""
    g = cfg.expansion.grow
    logger = get_run_logger()
    seeds = with_grown(load_seeds(cfg.topics), cfg.output.dir)
    kept = _topic_counts(version_dir / "text")
    planned = _topic_counts(version_dir / "plan.parquet")
    leaves = leaves_to_grow(seeds, kept, planned, g.leaves)
    if not leaves:
        logger.info("the topic tree did not grow: no leaf kept a document")
        return {"grown": 0}
    try:
        nodes, report = expand.fn([as_node(s) for s in leaves], 1, g.breadth, cfg,
                                  [s.topic for s in seeds])  # fmt: skip
    except Exception as e:  # an endpoint down after the run: tomorrow grows instead
        logger.warning("the topic tree did not grow: %s", e)
        return {"grown": 0, "error": str(e)}
    added = add_grown(cfg.output.dir, leaves, nodes, run_id, g.new_topics)
    logger.info("the topic tree grew by %d under %s: %s (proposed %d, dropped %s, relevance "
                "%s)", len(added), [s.topic for s in leaves], [s.topic for s in added],
                report.proposed, dict(report.dropped), dict(report.relevance))  # fmt: skip
    return {"grown": len(added), "leaves": [s.topic for s in leaves], "kept": report.kept}


def _topic_counts(path: Path) -> Counter[str]:
    """Rows per topic key (`topic_path`) of a version's Parquet file or folder."""
    counts: Counter[str] = Counter()
    for batch in ds.dataset(path, format="parquet").to_batches(columns=["topic_path"]):
        counts.update(topic_key(p) for p in batch.column(0).to_pylist())
    return counts


FAILURES_SHOWN = 100  # the failures table shows the first ones; failures.parquet has all


def without_samples(report: str) -> str:
    """The report without its sample documents: Prefect keeps artifacts in its own database,
    where no takedown reaches, so an artifact quotes no document (report.md, which a takedown
    regenerates, does)."""
    head, found, tail = report.partition(f"\n{SAMPLES_HEADING}\n")
    if not found:
        return report
    rest = tail.partition("\n## ")
    kept = f"\n## {rest[2]}" if rest[1] else ""
    note = f"\n{SAMPLES_HEADING}\n\nIn the version's report/report.md (not kept in Prefect).\n"
    return head + note + kept


def publish_artifacts(report_md: Path, version_dir: Path, run_id: str) -> None:
    """The run report and the first failures as Prefect artifacts (the UI's view of a run)."""
    create_markdown_artifact(
        redact_text(without_samples(report_md.read_text(encoding="utf-8"))),
        key="booksmith-run-report",
        description=f"booksmith run {run_id}",
    )
    failures = pq.ParquetFile(version_dir / "failures.parquet")
    total = failures.metadata.num_rows
    rows: list[dict[str, Any]] = []
    if total:
        first = next(failures.iter_batches(FAILURES_SHOWN, columns=["request_id", "error",
                                                                     "attempts"]))  # fmt: skip
        rows = [
            {
                "request_id": r["request_id"],
                "reason": redact_text(r["error"] or ""),  # an error may quote a URL
                "attempts": r["attempts"],
            }
            for r in first.to_pylist()
        ]
    create_table_artifact(
        rows or [{"request_id": "", "reason": "no failures", "attempts": 0}],
        key="booksmith-run-failures",
        description=f"failed requests of run {run_id}: the first {len(rows)} of {total}",
    )


@flow(name="booksmith-nightly", log_prints=True)
def nightly(
    config: str | None = None,
    topics: str | None = None,
    out: str | None = None,
    limit: int | None = None,
    seed: int | None = None,
    sources: list[str] | None = None,
) -> str:
    """Generate one dataset version; returns its directory."""
    cfg = resolve_config(config, topics, out, limit, seed, sources)
    preflight.check(cfg)  # in seconds, before anything is planned or spent
    # A scheduled run's date is its scheduled time (a late start still plans its own night).
    started = flow_run.scheduled_start_time or datetime.now(UTC)
    run_seed = cfg.seed if cfg.seed is not None else seed_for(started.astimezone(UTC).date())
    seeds, selection, key = load_topics(cfg, run_seed)
    sync_index(cfg)
    done = completed_version(cfg.output.dir, key)
    if done is not None:  # a retried night: the same config, seed and topics
        return str(already_done(cfg, done))
    _, grounded = announce_estimate(cfg, seeds, run_seed)  # refuses here over the budget
    run_id = start_run(cfg, key)
    get_run_logger().info("run %s: %d topics, seed %d", run_id, len(seeds), run_seed)
    try:
        manifest = stream_chunks(cfg, run_id, seeds, run_seed, key, selection, grounded)
    except Exception as e:
        if not disk_full(e):
            raise
        reason = " ".join(str(e).split())
        raise DiskFull(
            f"output.dir: the disk holding {cfg.output.dir} is full ({reason}); free "
            "some space and run again with the same config and seed: it resumes at its last "
            "completed chunk, every answer so far is in the cache, and no version was published"
        ) from e
    if problem := publish_problem(manifest, cfg.publish):
        raise not_published(cfg, run_id, problem)
    version_dir = cfg.output.dir / run_id
    release_run_dir(version_dir)
    after_run(cfg, version_dir, run_id)
    get_run_logger().info("wrote %s: %d documents", version_dir, manifest.documents)
    return str(version_dir)


def stream_chunks(
    cfg: RunConfig, run_id: str, seeds: list[TopicSeed], seed: int, key: str,
    selection: dict[str, Any], grounded: MixedPlan | None = None,
) -> Manifest:  # fmt: skip
    """The run's chunks through generation and the filters, generation of one overlapping the
    filtering of the one before; then the version, then the index commit."""
    index = open_index(cfg.dedup, cfg.output.dir)
    process: GenerationProcess | None = None
    try:
        with (
            open_endpoints(cfg.generation, cfg.embedded) as endpoints,
            StreamingRun(cfg, run_id, seeds, seed, index, key, grounded) as run,
        ):
            dask = dask_client()
            run.state.quality.client = dask  # on Dask, the quality slices run there
            process = generation_process(cfg, len(endpoints), dask is not None)
            run.state.judge.bind(cfg, endpoints)  # the faithfulness judge asks the run's endpoint
            artifact = cast(UUID, create_progress_artifact(0.0, description=f"run {run_id}"))
            generated = copy.deepcopy(run.state.generation)  # a resumed run's chunks included

            def start(chunk: Chunk) -> Generating:
                progress.emit("plan", total=run.rounds.planned)
                return Generating(chunk, endpoints, cfg, run_id, generated, process)

            def finish(chunk: Chunk, report: GenerationReport) -> None:
                process_chunk(run, unvisited(chunk), unvisited(report))
                share = 100.0 * (chunk.number + 1) / max(1, run.rounds.next_chunk)
                update_progress_artifact(artifact, share)

            if run.resumed:
                get_run_logger().info("resuming run %s after chunk %d", run_id, run.resumed)
            run_rounds(
                run.rounds, start, finish, run.tally, lambda: run.state.generation,
                done=run.resumed, replay=run.replay,
            )  # fmt: skip
            stop, need = run.rounds.stop, run.rounds.need
            get_run_logger().info("fill: %s; still short: %s", stop, need or "-")
            manifest = write_dataset(run, selection)
            if publish_problem(manifest, cfg.publish):
                return manifest  # not a version (see `nightly`): nothing enters the index
            crash_point("index.commit")
            commit_index(run)
            crash_point("index.committed")
            run.commit_sources()
            return manifest
    finally:
        if process is not None:
            process.close()
        if index is not None:
            index.close()


def generation_process(cfg: RunConfig, endpoints: int, on_dask: bool) -> GenerationProcess | None:
    """Live generation runs in processes of its own, one per partition, so that it does not
    share the flow's interpreter with the chunk pipeline (generation/process.py); on Dask it
    runs on the workers, and the Batch API's client mostly waits."""
    if on_dask or cfg.generation.backend == "batch":
        return None
    return GenerationProcess(cfg.generation.partitions or endpoints)


def not_published(cfg: RunConfig, run_id: str, problem: str) -> RunNotPublished:
    """Set a finished run that must not be a version aside, with its report, and say so."""
    kept_at = set_aside(cfg.output.dir, run_id)
    render_report(kept_at)
    return RunNotPublished(
        f"run {run_id} is not published: {problem}; its failures, rejected documents and "
        f"report are in {kept_at}"
    )


def already_done(cfg: RunConfig, version: Path) -> Path:
    """A rerun of a complete version: release it and write its report if a kill cut them."""
    sweep_abandoned(cfg.output.dir)
    if cfg.sources and not recorded(cfg.output.dir, version.name):  # killed before it
        record_planned(cfg.output.dir, version.name, version_keys(version))
    if not (version / "report" / "report.md").exists():
        render_report(version)
    get_run_logger().info("nothing to do: %s has this config, seed and topics", version)
    return version


def start_run(cfg: RunConfig, key: str) -> str:
    """Resume a killed run of this key, or sweep what killed runs left and claim a new run
    directory."""
    resumed = resumable_run(cfg.output.dir, key)
    if resumed is not None:
        return resumed
    abandoned = sweep_abandoned(cfg.output.dir)
    if abandoned:
        get_run_logger().info("removed the unfinished directories of killed runs: %s", abandoned)
    return claim_run_dir(cfg.output.dir)


def after_run(cfg: RunConfig, version_dir: Path, run_id: str) -> None:
    """The report and artifacts, then what the config adds: retraining, export, training."""
    report_md = render_report(version_dir)
    publish_artifacts(report_md, version_dir, run_id)
    if cfg.filters.quality.retrain_every_days:
        retrain_quality(cfg, version_dir)
    if cfg.expansion.grow.new_topics:
        grow_tree(cfg, version_dir, run_id)
    if cfg.export.to:
        target = cfg.export.to.rstrip("/") + "/" + run_id
        export_version(version_dir, target, cfg.export.workers, cfg.export.verify)
    if cfg.train.enabled:
        from booksmith.flows.train import train_flow

        train_out = cfg.train.out or state_dir(cfg.output.dir) / "train" / run_id
        train_flow(
            data=str(version_dir),
            config=str(cfg.train.config) if cfg.train.config else None,
            out=str(train_out),
            max_steps=cfg.train.max_steps,
        )
