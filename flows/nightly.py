"""The nightly flow: topics -> plan -> generate -> filter (exact dedup, quality rules, MinHash)
-> dataset version -> index commit -> report; then, when configured, retrain the quality
classifier, export the version and train on it.

A flow wires stages; each stage is a plain function in its own package. Tasks declare their
retries and cache policies here. Generation is idempotent (the durable response cache under
`<out>/_state/`), so its task can retry, and a killed run started again re-requests nothing
that finished. With fill targets the generate-and-filter part repeats in rounds; generation
runs as partitions (one task each) on the flow's task runner, threads or Dask.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any, cast
from uuid import UUID

from prefect import flow, get_run_logger, task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from filters import ChainResult, nightly_chain, run_chain
from filters.dedup import commit, open_index, reconcile
from flows.export import export_version
from flows.report import quality_histogram, render_report
from generation import progress
from generation.backends import model_name, open_endpoints
from generation.batch import BatchGenerationClient
from generation.cache import ResponseCache
from generation.client import Endpoint, GenerationClient, GenerationReport
from generation.coverage import deficit, seeds_for, select_topics
from generation.diversity import diversity_report
from generation.documents import to_documents
from generation.plan import build_plan
from generation.scaleout import assign, merge_reports, partition, share_budget
from generation.seeds import load_seeds
from prompts import PromptLibrary
from schemas import Document, GenerationRequest, GenerationResult, TopicSeed
from schemas.config import Budget, EncodingFile, FillSettings, RunConfig, load_config
from schemas.crashpoints import crash_point
from shards.dataset import write_version
from shards.encodings import EncodingSpec, get_encoding
from shards.version import claim_run_dir, release_run_dir, state_dir, sweep_abandoned

PROGRESS_EVERY_S = 5.0


def _stop_reason(
    fill: FillSettings, need: dict[str, int], report: GenerationReport, rounds: int
) -> str | None:
    """Why the run stops planning more (None: plan another round)."""
    if not fill.enabled:
        return "single_round"
    if not need:
        return "target_met"
    if report.budget_exhausted:
        return "budget_exhausted"
    if rounds >= fill.max_rounds:
        return "max_rounds"
    return None


def seed_for(day: date) -> int:
    """A scheduled run's seed comes from its date, so each night plans new text."""
    return int(day.strftime("%Y%m%d"))


def encoding_spec(entry: str | EncodingFile) -> EncodingSpec:
    if isinstance(entry, str):
        return EncodingSpec(entry)
    return EncodingSpec(entry.name, entry.bpe_file, entry.sha256)


def resolve_config(
    config: str | None = None,
    topics: str | None = None,
    out: str | None = None,
    limit: int | None = None,
    seed: int | None = None,
) -> RunConfig:
    """The config file with the command line's flags on top (flags win)."""
    overrides = {"topics": topics, "output.dir": out, "plan.limit": limit, "seed": seed}
    return load_config(Path(config) if config else None, overrides)


# Stage inputs are large (thousands of requests): hashing them for Prefect's cache would cost
# more than the stages, and the generation stage has its own durable cache. So: NO_CACHE.


@task(cache_policy=NO_CACHE)
def load_topics(cfg: RunConfig) -> tuple[list[TopicSeed], dict[str, Any]]:
    """The seed file's topics, narrowed to this run's share when `plan.topics_per_run` is set."""
    return select_topics(load_seeds(cfg.topics), cfg.plan, cfg.output.dir)


def make_plan(
    seeds: list[TopicSeed], cfg: RunConfig, seed: int, **kw: Any
) -> list[GenerationRequest]:
    """The requests for these topics under the run config (also `booksmith plan`'s preview)."""
    return build_plan(
        seeds,
        PromptLibrary(cfg.plan.axes, cfg.plan.templates),
        model=model_name(cfg.generation),
        sampling=cfg.generation.sampling,
        seed=seed,
        seed_words=cfg.plan.seed_words,
        covered_units=cfg.plan.covered_units,
        system_prompt=cfg.plan.system_prompt,
        **kw,
    )


@task(cache_policy=NO_CACHE)
def plan_requests(seeds: list[TopicSeed], cfg: RunConfig, seed: int) -> list[GenerationRequest]:
    return make_plan(
        seeds, cfg, seed, samples_per_topic=cfg.plan.samples_per_topic, limit=cfg.plan.limit
    )


@task(cache_policy=NO_CACHE)
def plan_fill_round(
    wanted: list[tuple[TopicSeed, int]], cfg: RunConfig, seed: int, round_no: int,
    planned: set[str],
) -> list[GenerationRequest]:  # fmt: skip
    """More requests for the topics whose targets the kept documents have not met yet."""
    seeds = [t.model_copy(update={"weight": float(n)}) for t, n in wanted]
    plan = make_plan(seeds, cfg, seed, samples_per_topic=1, salt=f"-fill-{round_no}")
    return [r for r in plan if r.id not in planned]


@task(retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE)
def generate(
    plan: list[GenerationRequest],
    endpoint: Endpoint,
    cfg: RunConfig,
    run_id: str,
    budget: Budget,
    part: str = "",
) -> GenerationReport:
    """One partition of the plan against one endpoint (a run has one partition unless
    `generation.partitions` or several endpoints ask for more)."""
    gen = cfg.generation
    cache = ResponseCache(state_dir(cfg.output.dir) / "responses.sqlite")
    encoding = get_encoding(cfg.output.encoding)

    # A progress artifact in the Prefect UI, updated at most every few seconds.
    label = f"generation{' ' + part if part else ''} of run {run_id}"
    artifact = cast(UUID, create_progress_artifact(0.0, description=label))
    last_update = [time.monotonic()]

    def on_result(result: GenerationResult, report: GenerationReport) -> None:
        progress.emit("generation", result=result, report=report, part=part)
        done = report.completed + report.failed + report.skipped_budget
        now = time.monotonic()
        if now - last_update[0] >= PROGRESS_EVERY_S or done == report.planned:
            last_update[0] = now
            share = 100.0 * done / max(1, report.planned)
            # _sync: we are inside the client's event loop; a short blocking call is fine here
            update_progress_artifact(artifact, share, _sync=True)  # type: ignore[call-arg]

    common: dict[str, Any] = {
        "cache": cache,
        "run_id": run_id,
        "budget": budget,
        "retry_failed": gen.retry_failed,
        "on_result": on_result,
        "token_counter": lambda text: len(encoding.encode_ordinary(text)),
    }
    try:
        client: GenerationClient | BatchGenerationClient
        if gen.backend == "batch":
            b = gen.batch
            client = BatchGenerationClient(
                endpoint,
                state_dir=b.state_dir or state_dir(cfg.output.dir) / "batches",
                prices={m: p.scaled(b.price_factor) for m, p in gen.prices.items()},
                poll_interval_s=b.poll_interval_s,
                completion_window=b.completion_window,
                max_requests_per_file=b.max_requests_per_file,
                max_bytes_per_file=b.max_bytes_per_file,
                keep_files=b.keep_files,
                **common,
            )
        else:
            client = GenerationClient(endpoint, prices=gen.prices, **common)
        return asyncio.run(client.run(plan))
    finally:
        cache.close()


def generate_all(
    plan: list[GenerationRequest], endpoints: list[Endpoint], cfg: RunConfig, run_id: str,
    budget: Budget,
) -> GenerationReport:  # fmt: skip
    """Every partition as its own task, side by side on the flow's task runner."""
    # One batch client per state directory: the Batch API backend runs as one partition.
    wanted = 1 if cfg.generation.backend == "batch" else cfg.generation.partitions
    parts = partition(plan, wanted or len(endpoints))
    shares = assign(parts, endpoints)
    each = share_budget(budget, len(parts))
    if len(parts) == 1:
        return generate(parts[0], shares[0], cfg, run_id, each)
    futures = [
        generate.submit(part, endpoint, cfg, run_id, each, f"part {k + 1}/{len(parts)}")
        for k, (part, endpoint) in enumerate(zip(parts, shares, strict=True))
    ]
    return merge_reports([f.result() for f in futures])


def remaining(budget: Budget, spent: GenerationReport) -> Budget:
    """What the budget leaves after earlier rounds (None stays unlimited)."""
    tokens = spent.prompt_tokens + spent.completion_tokens
    return Budget(
        max_tokens=max(1, budget.max_tokens - tokens) if budget.max_tokens else None,
        max_cost_usd=max(1e-9, budget.max_cost_usd - spent.cost_usd)
        if budget.max_cost_usd
        else None,
    )


@task(cache_policy=NO_CACHE)
def make_documents(
    plan: list[GenerationRequest], report: GenerationReport, cfg: RunConfig, run_id: str
) -> tuple[list[Document], list[GenerationResult]]:
    return to_documents(plan, report.results, run_id=run_id, encoding=cfg.output.encoding)


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
def filter_documents(docs: list[Document], cfg: RunConfig) -> ChainResult:
    """Exact dedup, the quality chain, then MinHash dedup; the index is only read here."""
    index = open_index(cfg.dedup, cfg.output.dir)
    try:
        chain = nightly_chain(cfg.filters, cfg.dedup, index, state=state_dir(cfg.output.dir))
        result = run_chain(docs, chain)
        crash_point("filter.done")
        return result
    finally:
        if index is not None:
            index.close()


@task(retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE)
def commit_index(cfg: RunConfig, run_id: str, kept: list[Document]) -> int:
    """Add this run's documents to the MinHash index: only after its manifest exists, so a run
    killed before that never finds its own documents there when it is run again."""
    index = open_index(cfg.dedup, cfg.output.dir)
    if index is None:
        return 0
    try:
        return commit(index, run_id, kept, cfg.dedup)
    finally:
        index.close()


@task(retries=1, cache_policy=NO_CACHE)
def write_dataset(
    cfg: RunConfig,
    run_id: str,
    seed: int,
    plan: list[GenerationRequest],
    report: GenerationReport,
    chain: ChainResult,
    failures: list[GenerationResult],
    selection: dict[str, Any] | None = None,
    fill: dict[str, Any] | None = None,
) -> dict[str, Any]:
    library = PromptLibrary(cfg.plan.axes, cfg.plan.templates)
    diversity = diversity_report(
        [d.text for d in chain.kept],
        [{"audience": d.audience, "style": d.style, "format": d.format} for d in chain.kept],
        {
            "audience": list(library.axes.audiences),
            "style": list(library.axes.styles),
            "format": list(library.axes.formats),
        },
    )
    counts = {
        "plan": {"requests": len(plan), "topics": selection or {}},
        "fill": fill or {},
        "generate": report.summary(),
        "filter": chain.counts,
        "kept": len(chain.kept),
        "rejected": len(chain.rejected),
    }
    return write_version(
        cfg.output.dir / run_id,
        run_id=run_id,
        plan=plan,
        kept=chain.kept,
        rejected=chain.rejected,
        failures=failures,
        shard_rows=cfg.output.shard_rows,
        shard_bytes=cfg.output.shard_bytes,
        encoding=cfg.output.encoding,
        encodings=[encoding_spec(e) for e in cfg.output.encodings],
        pack_seq_len=cfg.output.pack_seq_len,
        card=cfg.output.card.model_dump(exclude_none=True),
        config=cfg.model_dump(mode="json"),
        config_hash=cfg.config_hash(),
        counts=counts,
        extra={
            "seed": seed,
            "diversity": diversity,
            "quality": quality_histogram(
                [d.quality_score for d in chain.kept], [r.quality_score for r in chain.rejected]
            ),
        },
    )


@task(cache_policy=NO_CACHE)
def retrain_quality(cfg: RunConfig, version_dir: Path) -> dict[str, Any]:
    """Re-annotate a sample of the new version with the judge and retrain the classifier when
    `filters.quality.retrain_every_days` says it is due; the next run filters with the new
    model. A failure here is logged, not raised: the version is already written."""
    from flows.cli_quality import MODEL_DIR, retrain_due, run_annotate, run_train

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


def publish_artifacts(report_md: Path, failures: list[GenerationResult], run_id: str) -> None:
    """The run report and the failures table as Prefect artifacts (the UI's view of a run)."""
    create_markdown_artifact(
        report_md.read_text(encoding="utf-8"),
        key="booksmith-run-report",
        description=f"booksmith run {run_id}",
    )
    rows = [
        {"request_id": f.request_id, "reason": f.error, "attempts": f.attempts} for f in failures
    ]
    create_table_artifact(
        rows or [{"request_id": "", "reason": "no failures", "attempts": 0}],
        key="booksmith-run-failures",
        description=f"failed requests of run {run_id}",
    )


@flow(name="booksmith-nightly", log_prints=True)
def nightly(
    config: str | None = None,
    topics: str | None = None,
    out: str | None = None,
    limit: int | None = None,
    seed: int | None = None,
) -> str:
    """Generate one dataset version; returns its directory."""
    cfg = resolve_config(config, topics, out, limit, seed)
    # A scheduled run's date is its scheduled time (a late start still plans its own night).
    started = flow_run.scheduled_start_time or datetime.now(UTC)
    run_seed = cfg.seed if cfg.seed is not None else seed_for(started.astimezone(UTC).date())
    logger = get_run_logger()
    seeds, selection = load_topics(cfg)
    plan = plan_requests(seeds, cfg, run_seed)
    abandoned = sweep_abandoned(cfg.output.dir)
    if abandoned:
        logger.info("removed the unfinished directories of killed runs: %s", abandoned)
    run_id = claim_run_dir(cfg.output.dir)
    logger.info("run %s: %d topics, %d requests, seed %d", run_id, len(seeds), len(plan), run_seed)
    synced = sync_index(cfg)
    if synced.get("added") or synced.get("removed"):
        logger.info("dedup index reconciled with %s: %s", cfg.output.dir, synced)

    progress.emit("plan", total=len(plan))
    docs: list[Document] = []
    failures: list[GenerationResult] = []
    reports: list[GenerationReport] = []
    rounds: list[dict[str, Any]] = []
    round_plan, fill = plan, cfg.fill
    with open_endpoints(cfg.generation, cfg.embedded) as endpoints:
        while True:
            budget = remaining(cfg.generation.budget, merge_reports(reports))
            report = generate_all(round_plan, endpoints, cfg, run_id, budget)
            new_docs, new_failures = make_documents(round_plan, report, cfg, run_id)
            reports.append(report)
            docs += new_docs
            failures += new_failures
            # Each round filters every document so far: dedup sees all rounds together.
            chain = filter_documents(docs, cfg)
            need = deficit(fill, chain.kept, seeds) if fill.enabled else {}
            rounds.append({"planned": len(round_plan), "kept_total": len(chain.kept)})
            stop = _stop_reason(fill, need, report, len(rounds))
            if stop is not None:
                break
            keep_rate = len(chain.kept) / max(1, len(plan))  # kept per request so far
            wanted = seeds_for(need, seeds, keep_rate, fill.oversample)
            round_plan = plan_fill_round(wanted, cfg, run_seed, len(rounds), {r.id for r in plan})
            plan = plan + round_plan
            progress.emit("plan", total=len(plan))
            if not round_plan:
                stop = "nothing_to_plan"
                break
    report = merge_reports(reports)
    fill_account: dict[str, Any] = {"stopped": stop, "rounds": rounds, "short": need}
    if fill.enabled:
        logger.info("fill: %s after %d round(s); still short: %s", stop, len(rounds), need or "-")
    manifest = write_dataset(
        cfg, run_id, run_seed, plan, report, chain, failures, selection, fill_account
    )
    version_dir = cfg.output.dir / run_id
    crash_point("index.commit")
    commit_index(cfg, run_id, chain.kept)
    crash_point("index.committed")
    release_run_dir(version_dir)
    report_md = render_report(version_dir)
    publish_artifacts(report_md, failures, run_id)
    if cfg.filters.quality.retrain_every_days:
        retrain_quality(cfg, version_dir)
    if cfg.export.to:
        target = cfg.export.to.rstrip("/") + "/" + run_id
        export_version(version_dir, target, cfg.export.workers, cfg.export.verify)
    if cfg.train.enabled:
        from flows.train import train_flow

        train_out = cfg.train.out or state_dir(cfg.output.dir) / "train" / run_id
        train_flow(
            data=str(version_dir),
            config=str(cfg.train.config) if cfg.train.config else None,
            out=str(train_out),
            max_steps=cfg.train.max_steps,
        )
    logger.info("wrote %s: %d documents", version_dir, manifest["documents"])
    return str(version_dir)
