"""Client overhead: booksmith's generation stage against a bare AsyncOpenAI loop.

Both sides send the same number of distinct chat completions to the fake server in fast mode
(one prebuilt reply, so the server is not what is measured), from one process, alternately
A B A B; the best run of each counts. booksmith runs with its cache (a fresh SQLite file per
run, distinct prompts so it never hits), rpm/tpm limits set high enough not to throttle (adaptive,
the default: generation/limits.py), the circuit breaker, a price table and a budget cap, so every
per-request cost it adds is paid.

    python -m benchmarks.client_overhead [--requests 20000] [--concurrency 256]

Ends with `RESULT client_overhead:bare_openai ratio=<booksmith/bare> ...` (req/s; higher is
better, so a ratio near 1 means booksmith adds little).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import platform
import tempfile
import time
from pathlib import Path

import httpx2
import openai

from tests.fakeserver import FakeServer

MODEL = "m"
MAX_TOKENS = 16


def prompt(run: str, i: int) -> str:
    # The run label keeps prompts distinct across runs too, so no cache or server state helps.
    return f"[{run}] Write one short paragraph about item {i}."


async def bare_openai(
    base_url: str, run: str, n: int, concurrency: int, pooled: bool = False
) -> float:
    """The baseline: a bare client, a semaphore and gather. Returns requests per second.

    `pooled` gives the bare client the same connection pool as booksmith's (one keep-alive
    connection per request in flight), to show booksmith's own overhead without that edge."""
    http = None
    if pooled:
        limits = httpx2.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        http = openai.DefaultAsyncHttpxClient(limits=limits)
    api = openai.AsyncOpenAI(base_url=base_url, api_key="x", max_retries=0, http_client=http)
    messages = [[{"role": "user", "content": prompt(run, i)}] for i in range(n)]
    sem = asyncio.Semaphore(concurrency)

    async def one(msgs: list[dict[str, str]]) -> str:
        async with sem:
            response = await api.chat.completions.create(
                model=MODEL,
                messages=msgs,  # type: ignore[arg-type]
                max_tokens=MAX_TOKENS,
                temperature=0.7,
                top_p=0.95,
            )
            return response.choices[0].message.content or ""

    started = time.perf_counter()
    texts = await asyncio.gather(*(one(m) for m in messages))
    elapsed = time.perf_counter() - started
    await api.close()
    assert len(texts) == n and all(texts)
    return n / elapsed


async def booksmith(base_url: str, run: str, n: int, concurrency: int, tmp: Path) -> float:
    """booksmith's generation stage over the same kind of requests. Returns requests per second."""
    from booksmith.generation.breaker import Breaker
    from booksmith.generation.cache import ResponseCache
    from booksmith.generation.client import Endpoint, GenerationClient
    from booksmith.schemas import GenerationRequest, Sampling
    from booksmith.schemas.config import BreakerSettings, Budget, Price

    sampling = Sampling(max_tokens=MAX_TOKENS, temperature=0.7, top_p=0.95)
    requests = [
        GenerationRequest.build(
            messages=[{"role": "user", "content": prompt(run, i)}],
            model=MODEL,
            sampling=sampling,
            sample_index=i,
        )
        for i in range(n)
    ]
    endpoint = Endpoint(
        base_url=base_url,
        api_key="x",
        model=MODEL,
        max_concurrency=concurrency,
        rpm=1e9,  # active limiters that never make anyone wait
        tpm=1e12,
        timeout_s=60,
        max_retries=6,
    )
    client = GenerationClient(
        endpoint,
        cache=ResponseCache(tmp / f"cache-{run}.sqlite"),
        run_id="bench",
        prices={MODEL: Price(prompt_per_million=0.1, completion_per_million=0.4)},
        budget=Budget(max_cost_usd=1e6),
        breaker=Breaker(BreakerSettings()),
    )
    started = time.perf_counter()
    report = await client.run(requests)
    elapsed = time.perf_counter() - started
    assert report.completed == n and report.failed == 0 and report.cached == 0, report.summary()
    return n / elapsed


async def bench(n: int, concurrency: int, rounds: int) -> tuple[float, float]:
    best_bare = best_bs = best_pooled = 0.0
    with FakeServer(fast=True) as server, tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds):
            for side in ("bare_openai", "booksmith", "bare_pooled"):
                gc.collect()
                before = server.stats()
                run = f"{side}-{r}"
                if side == "bare_openai":
                    rate = await bare_openai(server.base_url, run, n, concurrency)
                    best_bare = max(best_bare, rate)
                elif side == "bare_pooled":
                    rate = await bare_openai(server.base_url, run, n, concurrency, pooled=True)
                    best_pooled = max(best_pooled, rate)
                else:
                    rate = await booksmith(server.base_url, run, n, concurrency, Path(tmp))
                    best_bs = max(best_bs, rate)
                after = server.stats()
                sent = after["requests"] - before["requests"]
                conns = after["connections"] - before["connections"]
                print(
                    f"round {r} {side:12s} {rate:8.0f} req/s "
                    f"({sent} requests, {conns} connections)",
                    flush=True,
                )
    print(
        f"booksmith / bare client with booksmith's connection pool: {best_bs / best_pooled:.3f} "
        f"({best_bs:.0f} vs {best_pooled:.0f} req/s)",
        flush=True,
    )
    return best_bs, best_bare


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="booksmith's generation client vs bare openai")
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=2, help="A B rounds; the best of each")
    args = parser.parse_args(argv)
    print(
        f"python {platform.python_version()} openai {openai.__version__} on {os.cpu_count()} "
        f"cores; fake server in fast mode; {args.requests} requests, "
        f"concurrency {args.concurrency}",
        flush=True,
    )
    bs, bare = asyncio.run(bench(args.requests, args.concurrency, args.rounds))
    print(
        f"RESULT client_overhead:bare_openai ratio={bs / bare:.3f} booksmith={bs:.0f} "
        f"baseline={bare:.0f} unit=req/s"
    )


if __name__ == "__main__":
    main()
