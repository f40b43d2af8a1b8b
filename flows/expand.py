"""The topic-expansion flow: seed topics -> a topic tree -> a topic file `booksmith run` reads.

Requests go through the generation client and the response cache under `<out>/_state/`, so an
expansion killed half-way and started again asks nothing twice.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from booksmith.generation import preflight
from booksmith.generation.backends import open_endpoint
from booksmith.generation.cache import ResponseCache
from booksmith.generation.clients import make_client
from booksmith.generation.topics import (
    ExpansionReport,
    TopicExpander,
    TopicNode,
    subtopics_format,
    write_topic_file,
)
from booksmith.schemas import GenerationRequest, GenerationResult
from booksmith.schemas.config import RunConfig, load_config
from booksmith.shards.version_dir import state_dir


@task(retries=1, retry_delay_seconds=5, cache_policy=NO_CACHE)
def expand(
    roots: Sequence[str | TopicNode],
    depth: int,
    breadth: int,
    cfg: RunConfig,
    existing: Sequence[str],
    seed: int | None = None,
) -> tuple[list[TopicNode], ExpansionReport]:
    cache = ResponseCache(state_dir(cfg.output.dir) / "responses.sqlite")
    try:
        with open_endpoint(cfg.generation, cfg.embedded) as endpoint:
            # Expansion answers at once: the live client even when nightly runs use batches.
            client = make_client(cfg, endpoint, cache=cache, run_id="topics", batch=False)

            async def complete(
                requests: Sequence[GenerationRequest],
            ) -> dict[str, GenerationResult]:
                report = await client.run(requests)
                return {r.request_id: r for r in report.results}

            expander = TopicExpander(
                complete=complete,
                model=endpoint.model,
                breadth=breadth,
                depth=depth,
                relevance_check=cfg.expansion.relevance_check,
                sampling=cfg.expansion.sampling,
                # the subtopics schema, bounded by breadth (enforced where the endpoint can)
                response_format=subtopics_format(breadth)
                if cfg.expansion.structured_output
                else None,
                seed=seed,
                samples=cfg.expansion.samples,
                retries=cfg.expansion.retries,
            )
            nodes = asyncio.run(expander.expand(roots, existing))
            return nodes, expander.report
    finally:
        cache.close()


@flow(name="booksmith-expand-topics", log_prints=True)
def expand_topics(
    topics: list[str],
    output: str,
    depth: int = 2,
    breadth: int = 8,
    config: str | None = None,
    existing: str | None = None,
    leaves_only: bool = False,
    seed: int = 0,
) -> dict[str, Any]:
    """Expand topics into a tree and write it as a JSONL topic file; returns the counts, with
    per root its kept children and how many of them got at least 2 of their own. `seed` goes
    into every request's sampling seed: the same seed asks (and caches) the same requests."""
    from booksmith.generation.seeds import load_seeds

    cfg = load_config(Path(config) if config else None)
    preflight.check_expand(cfg, Path(output))  # in seconds, before any request
    known = [s.topic for s in load_seeds(existing)] if existing else []
    nodes, report = expand(list(topics), depth, breadth, cfg, known, seed)
    written = write_topic_file(nodes, Path(output), leaves_only=leaves_only)
    counts = {
        "topics_written": written,
        "nodes": len(nodes),
        "requests": report.requests,
        "proposed": report.proposed,
        "kept": report.kept,
        "dropped": dict(report.dropped),
        "answers_unparsed": report.answers_unparsed,
        "answers_failed": report.answers_failed,
        "relevance": dict(report.relevance),
        "structured_fallbacks": report.structured_fallbacks,
        "seed": seed,
        "per_root": report.per_root,
    }
    get_run_logger().info("expanded %s into %d topics: %s", topics, written, counts)
    return counts
