"""One call that builds the generation client a config asks for (the nightly run, topic
expansion): the live OpenAI-compatible client or the Batch API client, with the run's cache,
prices, budget and token counter."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from booksmith.generation.batch import BatchGenerationClient
from booksmith.generation.breaker import Breaker
from booksmith.generation.cache import ResponseCache
from booksmith.generation.client import Endpoint, GenerationClient
from booksmith.schemas import GenerationResult
from booksmith.schemas.config import Budget, RunConfig
from booksmith.shards.encodings import get_encoding
from booksmith.shards.version_dir import state_dir


def make_client(
    cfg: RunConfig,
    endpoint: Endpoint,
    *,
    cache: ResponseCache,
    run_id: str,
    budget: Budget | None = None,
    on_result: Callable[[GenerationResult, Any], None] | None = None,
    batch: bool | None = None,
    history: Sequence[str] = (),
    limits: Mapping[str, Mapping[str, float | None]] | None = None,
) -> GenerationClient | BatchGenerationClient:
    """`batch`: None follows `generation.backend`; False forces the live client. `history`:
    the circuit breaker's window so far (the run's earlier chunks); `limits`: where the
    adaptive limits ended in them, by endpoint URL (`GenerationReport.limits`)."""
    gen = cfg.generation
    encoding = get_encoding(cfg.output.encoding)
    common: dict[str, Any] = {
        "cache": cache,
        "run_id": run_id,
        "budget": budget if budget is not None else gen.budget,
        "retry_failed": gen.retry_failed,
        "on_result": on_result,
        "token_counter": lambda text: len(encoding.encode_ordinary(text)),
    }
    if batch if batch is not None else gen.backend == "batch":
        b = gen.batch
        return BatchGenerationClient(
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
    # The breaker watches live requests only: a batch's answers come back all at once, later.
    breaker = Breaker(gen.breaker, history)
    return GenerationClient(
        endpoint,
        prices=gen.prices,
        breaker=breaker,
        adaptive=gen.adaptive,
        limits_state=(limits or {}).get(endpoint.base_url),
        **common,
    )
