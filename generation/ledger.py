"""What a generation client spends and reports, shared by the live and the Batch API clients so
the two account alike: results into the GenerationReport, the budget (tokens and dollars) over
every run of the client, and reservations for requests in flight."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from booksmith.schemas import GenerationRequest, GenerationResult
from booksmith.schemas.config import Budget, Price

if TYPE_CHECKING:
    from booksmith.generation.breaker import Breaker
    from booksmith.generation.cache import ResponseCache


@dataclass
class GenerationReport:
    """Accounting for one run of the generation stage."""

    planned: int = 0
    completed: int = 0  # documents, fresh or from the cache
    cached: int = 0  # completions found in the cache (not requested)
    failed: int = 0
    skipped_budget: int = 0
    skipped_breaker: int = 0  # not attempted: the circuit breaker had tripped
    requests: int = 0  # HTTP attempts made
    retries: int = 0
    retry_reasons: Counter[str] = field(default_factory=Counter)  # why each retry was made
    rate_limited: int = 0  # attempts answered 429 (retried; the limits adapt to them)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    truncated: int = 0
    empty: int = 0
    failures: Counter[str] = field(default_factory=Counter)
    budget_exhausted: bool = False
    breaker: str | None = None  # why the circuit breaker tripped
    elapsed_s: float = 0.0
    results: list[GenerationResult] = field(default_factory=list, repr=False)
    # the breaker's window (its own deque while the client runs: no copy per result)
    outcomes: Sequence[str] = field(default_factory=list, repr=False)
    # the effective rate over time (generation/limits.py: a bounded series of points)
    rate: list[dict[str, Any]] = field(default_factory=list, repr=False)
    # where the adaptive limits ended, by endpoint URL: the run's next client starts there
    limits: dict[str, dict[str, float | None]] = field(default_factory=dict, repr=False)

    started_at: float = field(default_factory=time.perf_counter, repr=False)

    @property
    def completion_tokens_per_s(self) -> float:
        return self.completion_tokens / self.elapsed_s if self.elapsed_s else 0.0

    def completion_tokens_per_s_live(self) -> float:
        elapsed = time.perf_counter() - self.started_at
        return self.completion_tokens / elapsed if elapsed > 0 else 0.0

    def summary(self) -> dict[str, Any]:
        return {
            "planned": self.planned,
            "completed": self.completed,
            "cached": self.cached,
            "failed": self.failed,
            "skipped_budget": self.skipped_budget,
            "skipped_breaker": self.skipped_breaker,
            "requests": self.requests,
            "retries": self.retries,
            "retry_reasons": dict(self.retry_reasons),
            "rate_limited": self.rate_limited,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "cost_usd": round(self.cost_usd, 6),
            "truncated": self.truncated,
            "empty": self.empty,
            "failures": dict(self.failures),
            "budget_exhausted": self.budget_exhausted,
            "breaker": self.breaker,
            "elapsed_s": round(self.elapsed_s, 3),
            "rate": self.rate,
        }


class Ledger:
    def __init__(
        self,
        *,
        price: Price | None = None,
        budget: Budget | None = None,
        rate_limited: bool = False,
        on_result: Callable[[GenerationResult, GenerationReport], None] | None = None,
        token_counter: Callable[[str], int] | None = None,
        breaker: Breaker | None = None,
    ) -> None:
        self.price = price
        self.breaker = breaker
        self.budget = budget or Budget()
        self.on_result = on_result
        self._count_tokens = token_counter
        # Estimates cost a tokenizer pass: only made when a budget or a tokens-per-minute limit
        # needs them (`rate_limited`).
        self.needs_estimate = bool(
            rate_limited or self.budget.max_tokens or self.budget.max_cost_usd
        )
        self.reserved = 0.0  # estimated tokens of requests in flight
        self.spent_tokens = 0  # across every run of the client
        self.spent_usd = 0.0
        self.report = GenerationReport()

    def start(self, planned: int) -> GenerationReport:
        """A new report for one run; the budget keeps counting across runs."""
        self.report = GenerationReport(planned=planned)
        if self.breaker is not None:
            self.report.outcomes = self.breaker.outcomes
        return self.report

    def cost(self, prompt_tokens: float, completion_tokens: float) -> float:
        if self.price is None:
            return 0.0
        return (
            prompt_tokens * self.price.prompt_per_million
            + completion_tokens * self.price.completion_per_million
        ) / 1e6

    def estimate(self, request: GenerationRequest) -> float:
        """Prompt tokens (tiktoken) plus the completion cap: an upper bound, as OpenAI counts."""
        if not self.needs_estimate:
            return 0.0
        text = "\n".join(m.content for m in request.messages)
        prompt = self._count_tokens(text) if self._count_tokens else len(text) / 4
        return prompt + 4 * len(request.messages) + request.sampling.max_tokens

    def over_budget(self, estimate: float, max_tokens: int) -> bool:
        b = self.budget
        spent = self.spent_tokens + self.reserved
        if b.max_tokens is not None and spent + estimate > b.max_tokens:
            return True
        if b.max_cost_usd is not None:
            spent_usd = self.spent_usd + self.cost(self.reserved, 0)
            if spent_usd + self.cost(estimate - max_tokens, max_tokens) > b.max_cost_usd:
                return True
        return False

    def reserve(self, request: GenerationRequest, copies: int = 0) -> float | None:
        """Reserve the request's estimate, or None when the budget cannot cover it: the request
        (and `copies` repeats of it in the plan) count as skipped, and so does every later one."""
        report = self.report
        if self.breaker is not None and self.breaker.tripped:
            report.breaker = self.breaker.tripped
            report.skipped_breaker += 1 + copies
            return None
        if report.budget_exhausted:
            report.skipped_budget += 1 + copies
            return None
        estimate = self.estimate(request)
        if self.needs_estimate and self.over_budget(estimate, request.sampling.max_tokens):
            report.budget_exhausted = True
            report.skipped_budget += 1 + copies
            return None
        self.reserved += estimate
        return estimate

    def reserve_paid(self, request: GenerationRequest) -> float:
        """Reserve without a budget check: a request already submitted (a batch in flight)."""
        estimate = self.estimate(request)
        self.reserved += estimate
        return estimate

    def release(self, estimate: float) -> None:
        self.reserved -= estimate

    def from_cache(
        self, request: GenerationRequest, cache: ResponseCache | None, retry_failed: bool
    ) -> bool:
        """Account the request's cached answer, or its recorded permanent failure unless
        `retry_failed`; False when it has to be generated."""
        if cache is None:
            return False
        cached = cache.get(request.id)
        if cached is None:  # a taken-down text is never asked again, whatever retry_failed says
            cached = cache.taken_down(request.id) if retry_failed else None
        if cached is None and not retry_failed:
            cached = cache.permanent_failure(request.id)
        if cached is None:
            return False
        self.account(cached, cached=cached.ok, requested=False)
        return True

    def account(self, result: GenerationResult, *, cached: bool, requested: bool = True) -> None:
        """Count a result; `requested`: it was asked of the endpoint now (the breaker sees it)."""
        r = self.report
        if requested and not cached and self.breaker is not None:
            self.breaker.record(None if result.ok else result.error or "unknown")
            r.breaker = r.breaker or self.breaker.tripped
        if result.ok:
            r.completed += 1
            r.truncated += result.truncated
            r.empty += result.empty
            if cached:
                r.cached += 1
            else:
                cost = self.cost(result.prompt_tokens, result.completion_tokens)
                r.prompt_tokens += result.prompt_tokens
                r.completion_tokens += result.completion_tokens
                r.cost_usd += cost
                self.spent_tokens += result.prompt_tokens + result.completion_tokens
                self.spent_usd += cost
        else:
            r.failed += 1
            r.failures[result.error or "unknown"] += 1
        r.results.append(result)
        if self.on_result:
            self.on_result(result, r)
