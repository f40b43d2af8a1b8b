"""Embedded generation throughput: booksmith's server against llama-cpp-python used directly.

    python -m benchmarks.embedded_generation [--requests 16 --concurrency 8 --max-tokens 256]

booksmith: its generation stage (GenerationClient, with the response cache and accounting on)
against EmbeddedServer (continuous batching, the prepared Q8_0 file) with `concurrency`
requests in flight; server start-up is not timed.
baseline (llama_cpp_direct): the bundled Q4_1 file through llama-cpp-python's high-level
`Llama(...).create_chat_completion`, one request after another, as a user would drive it.
Both sides get the same prompts, sampling settings and max_tokens; the figure is generated
(completion) tokens per second of wall time.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from dataclasses import dataclass
from pathlib import Path

TOPICS = [
    "photosynthesis", "the French Revolution", "prime numbers", "plate tectonics",
    "the water cycle", "Newton's laws of motion", "supply and demand", "the immune system",
    "binary search", "the Roman Republic", "chemical bonding", "probability",
    "volcanoes", "the cell cycle", "electric circuits", "the printing press",
]  # fmt: skip

TEMPERATURE = 0.7
TOP_P = 0.95


def prompts(n: int) -> list[str]:
    return [
        f"Write a textbook section about {TOPICS[i % len(TOPICS)]} for high-school students."
        for i in range(n)
    ]


@dataclass
class Figure:
    tokens: int
    seconds: float

    @property
    def rate(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


async def _booksmith_requests(
    base_url: str, model: str, texts: list[str], concurrency: int, max_tokens: int
) -> Figure:
    """booksmith's own generation stage (GenerationClient: cache, limits, accounting on)."""
    import tempfile

    from booksmith.generation.cache import ResponseCache
    from booksmith.generation.client import Endpoint, GenerationClient
    from booksmith.schemas import GenerationRequest, Sampling

    requests = [
        GenerationRequest.build(
            messages=[{"role": "user", "content": text}],
            model=model,
            sampling=Sampling(max_tokens=max_tokens, temperature=TEMPERATURE, top_p=TOP_P, seed=i),
        )
        for i, text in enumerate(texts)
    ]
    endpoint = Endpoint(
        base_url=base_url, model=model, backend="embedded", max_concurrency=concurrency
    )
    with tempfile.TemporaryDirectory() as tmp:
        client = GenerationClient(endpoint, cache=ResponseCache(Path(tmp) / "cache.sqlite"))
        start = time.perf_counter()
        report = await client.run(requests)
        elapsed = time.perf_counter() - start
    assert report.completed == len(texts) and report.cached == 0, report.summary()
    return Figure(report.completion_tokens, elapsed)


def run_booksmith(texts: list[str], concurrency: int, max_tokens: int, threads: int) -> Figure:
    from booksmith.generation.embedded import EmbeddedServer

    with EmbeddedServer(n_parallel=concurrency, n_threads=threads) as server:
        return asyncio.run(
            _booksmith_requests(server.base_url, server.model_name, texts, concurrency, max_tokens)
        )


def run_baseline(texts: list[str], max_tokens: int, threads: int, model_path: Path) -> Figure:
    from llama_cpp import Llama

    llm = Llama(model_path=str(model_path), n_threads=threads, n_ctx=2048, verbose=False)
    tokens = 0
    start = time.perf_counter()
    for i, text in enumerate(texts):
        response = llm.create_chat_completion(
            messages=[{"role": "user", "content": text}],
            max_tokens=max_tokens,
            temperature=TEMPERATURE,
            top_p=TOP_P,
            seed=i,
        )
        tokens += response["usage"]["completion_tokens"]  # type: ignore[index]
    elapsed = time.perf_counter() - start
    llm.close()
    return Figure(tokens, elapsed)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)

    from booksmith.generation.embedded import bundled_gguf

    texts = prompts(args.requests)
    print(
        f"{args.requests} requests, max_tokens={args.max_tokens}, "
        f"temperature={TEMPERATURE}, top_p={TOP_P}, threads={args.threads}"
    )
    ours = run_booksmith(texts, args.concurrency, args.max_tokens, args.threads)
    print(
        f"booksmith (EmbeddedServer, Q8_0, {args.concurrency} in flight): "
        f"{ours.tokens} tokens in {ours.seconds:.1f} s = {ours.rate:.1f} tok/s"
    )
    base = run_baseline(texts, args.max_tokens, args.threads, bundled_gguf())
    print(
        f"llama_cpp_direct (Llama.create_chat_completion, Q4_1, sequential): "
        f"{base.tokens} tokens in {base.seconds:.1f} s = {base.rate:.1f} tok/s"
    )
    ratio = ours.rate / base.rate if base.rate > 0 else float("inf")
    print(
        f"RESULT embedded_generation:llama_cpp_direct ratio={ratio:.2f} "
        f"booksmith={ours.rate:.1f} baseline={base.rate:.1f} unit=tok/s"
    )


if __name__ == "__main__":
    main()
