"""Splitting the generation stage over endpoints and workers, and joining the results.

A plan is cut into partitions, each one task (so Dask, or Prefect's thread pool, runs them side
by side). Partition k goes to endpoint k mod E, and an endpoint's limits (concurrency, rpm, tpm,
budget) are split evenly between the partitions it serves, so together they never exceed what
the endpoint allows. The cut is by position in the plan: deterministic, and independent of which
worker finishes first, so a run on Dask writes the same dataset as a run on threads.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace

from booksmith.generation.client import Endpoint, GenerationReport
from booksmith.generation.limits import parallel_series
from booksmith.schemas import GenerationRequest
from booksmith.schemas.config import Budget


def partition(plan: Sequence[GenerationRequest], n: int) -> list[list[GenerationRequest]]:
    """`n` contiguous slices of nearly equal size (empty ones dropped)."""
    n = max(1, min(n, len(plan)))
    size = math.ceil(len(plan) / n) if plan else 0
    return [list(plan[i : i + size]) for i in range(0, len(plan), size)] if plan else [[]]


def share_endpoint(endpoint: Endpoint, partitions: int) -> Endpoint:
    """The endpoint as one of `partitions` tasks sees it: its share of every limit."""
    if partitions <= 1:
        return endpoint
    return replace(
        endpoint,
        max_concurrency=max(1, endpoint.max_concurrency // partitions),
        rpm=endpoint.rpm / partitions if endpoint.rpm else None,
        tpm=endpoint.tpm / partitions if endpoint.tpm else None,
    )


def share_budget(budget: Budget, partitions: int) -> Budget:
    if partitions <= 1:
        return budget
    return Budget(
        max_tokens=budget.max_tokens // partitions if budget.max_tokens else None,
        max_cost_usd=budget.max_cost_usd / partitions if budget.max_cost_usd else None,
    )


def assign(
    parts: Sequence[Sequence[GenerationRequest]], endpoints: Sequence[Endpoint]
) -> list[Endpoint]:
    """The endpoint of each partition (round robin), with its share of that endpoint's limits."""
    users = [
        sum(1 for k in range(len(parts)) if k % len(endpoints) == e) for e in range(len(endpoints))
    ]
    return [
        share_endpoint(endpoints[k % len(endpoints)], users[k % len(endpoints)])
        for k in range(len(parts))
    ]


def merge_reports(reports: Sequence[GenerationReport]) -> GenerationReport:
    """One report for the stage: sums, the union of failures, the slowest partition's time."""
    total = GenerationReport()
    for r in reports:
        for name in (
            "planned", "completed", "cached", "failed", "skipped_budget", "skipped_breaker",
            "requests", "retries", "rate_limited", "prompt_tokens", "completion_tokens",
            "cost_usd", "truncated", "empty",
        ):  # fmt: skip
            setattr(total, name, getattr(total, name) + getattr(r, name))
        total.failures.update(r.failures)
        total.retry_reasons.update(r.retry_reasons)
        total.budget_exhausted |= r.budget_exhausted
        total.breaker = total.breaker or r.breaker
        total.outcomes = [*total.outcomes, *r.outcomes]
        total.elapsed_s = max(total.elapsed_s, r.elapsed_s)
        total.results.extend(r.results)
        total.limits.update(r.limits)
    total.rate = parallel_series([r.rate for r in reports])  # side by side: summed
    return total
