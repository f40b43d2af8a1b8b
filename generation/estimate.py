"""What a run will cost, before it runs: tokens and dollars of its first round's plan.

Prompt tokens are counted with the run's encoding: exactly for the first `EXACT_PROMPTS`
requests, and for a larger plan as its total prompt characters times the tokens per character
of those (the plan streams: a million-request plan is counted, never held). Each message adds
`MESSAGE_OVERHEAD` tokens for the chat format (OpenAI's rule of thumb; servers differ by a few).
Completion tokens are at most `max_tokens` per request; the expected figure is the mean
completion length of the earlier versions in the output directory made with the same model
(capped at `max_tokens`), or `max_tokens` when there are none. Dollars come from
`generation.prices` (the Batch API's at `batch.price_factor`); a model without a price has
tokens only. Fill rounds may add requests up to `fill.max_requests`: the estimate covers the
first round, and says what the cap allows.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from booksmith.generation.backends import model_name
from booksmith.schemas import GenerationRequest
from booksmith.schemas.config import Price, RunConfig
from booksmith.schemas.manifest import ManifestError
from booksmith.shards.encodings import get_encoding
from booksmith.shards.version_dir import list_versions, read_manifest

EXACT_PROMPTS = 2_000
MESSAGE_OVERHEAD = 4


class OverBudget(ValueError):
    """The estimate exceeds `generation.budget.max_cost_usd` and the budget says refuse."""


@dataclass(frozen=True)
class Estimate:
    requests: int
    prompt_tokens: int
    completion_tokens_max: int
    completion_tokens_expected: int
    basis: str  # where the expected completion length comes from
    price: Price | None
    max_requests: int | None  # what fill rounds may plan in all (fill.max_requests), if set

    def cost(self, completion_tokens: int) -> float | None:
        if self.price is None:
            return None
        return (
            self.prompt_tokens * self.price.prompt_per_million
            + completion_tokens * self.price.completion_per_million
        ) / 1e6

    @property
    def cost_expected(self) -> float | None:
        return self.cost(self.completion_tokens_expected)

    @property
    def cost_max(self) -> float | None:
        return self.cost(self.completion_tokens_max)

    def line(self) -> str:
        """One line for a terminal or a log."""
        text = (
            f"estimate: {self.requests:,} requests, {self.prompt_tokens:,} prompt tokens, "
            f"{self.completion_tokens_expected:,} completion tokens expected ({self.basis}), "
            f"{self.completion_tokens_max:,} at most"
        )
        if self.price is None:
            text += "; no price for this model in generation.prices, so no dollars"
        else:
            text += f"; ${self.cost_expected:,.2f} expected, ${self.cost_max:,.2f} at most"
        if self.max_requests and self.max_requests > self.requests:
            text += f" (fill rounds may plan up to {self.max_requests:,} requests in all)"
        return text


def estimate(requests: Iterable[GenerationRequest], cfg: RunConfig, topics: int) -> Estimate:
    """The estimate of a run's first-round plan (a stream of requests over `topics` topics)
    under the run config."""
    encoding = get_encoding(cfg.output.encoding)
    n = exact_tokens = exact_chars = total_chars = max_completion = 0
    for request in requests:
        chars = sum(len(m.content) for m in request.messages)
        if n < EXACT_PROMPTS:
            exact_tokens += sum(
                len(encoding.encode_ordinary(m.content)) + MESSAGE_OVERHEAD
                for m in request.messages
            )
            exact_chars += chars
        total_chars += chars
        max_completion += request.sampling.max_tokens or 0
        n += 1
    prompt_tokens = exact_tokens
    if n > EXACT_PROMPTS and exact_chars:
        prompt_tokens = round(total_chars * exact_tokens / exact_chars)
    mean, versions = _completion_mean(cfg.output.dir, cfg.generation.model)
    per_request = max_completion / n if n else 0.0
    if mean is None:
        expected, basis = max_completion, "max_tokens, no earlier run of this model"
    else:
        expected = round(n * min(mean, per_request))
        basis = f"the mean of {versions} earlier version{'s' * (versions != 1)}"
    price = cfg.generation.prices.get(model_name(cfg.generation))
    if price is not None and cfg.generation.backend == "batch":
        price = price.scaled(cfg.generation.batch.price_factor)
    return Estimate(
        requests=n,
        prompt_tokens=prompt_tokens,
        completion_tokens_max=max_completion,
        completion_tokens_expected=expected,
        basis=basis,
        price=price,
        max_requests=cfg.fill.request_cap(n, topics) if cfg.fill.enabled else None,
    )


def _completion_mean(out: Path, model: str | None) -> tuple[float | None, int]:
    """Mean completion tokens per completed request over earlier versions with this
    `generation.model` setting (None: the backend's default model)."""
    tokens = completed = versions = 0
    for version in list_versions(out):
        try:
            manifest = read_manifest(version)
        except (ManifestError, OSError):
            continue  # a version this booksmith cannot read says nothing about cost
        if manifest.config.get("generation", {}).get("model") != model:
            continue
        gen = manifest.counts.generate
        if gen.completed:
            tokens += gen.completion_tokens
            completed += gen.completed
            versions += 1
    return (tokens / completed if completed else None), versions


def check_budget(est: Estimate, cfg: RunConfig) -> str | None:
    """A line when the expected cost exceeds the budget (raised as OverBudget when the budget
    says refuse), None when within it or unpriced."""
    cap = cfg.generation.budget.max_cost_usd
    cost = est.cost_expected
    if cap is None or cost is None or cost <= cap:
        return None
    message = (
        f"generation.budget.max_cost_usd: the run is expected to cost ${cost:,.2f}, above the "
        f"budget of ${cap:,.2f} (generation stops when the budget is spent); raise the budget, "
        "lower plan.limit or max_tokens"
    )
    if cfg.generation.budget.over_estimate == "refuse":
        raise OverBudget(message)
    return message
