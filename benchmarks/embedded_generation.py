"""Embedded generation throughput: booksmith's server against llama-cpp-python used directly,
and structured output (a JSON schema enforced by a grammar) against plain sampling.

    python -m benchmarks.embedded_generation [--requests 16 --concurrency 8 --max-tokens 256]
        [--rounds 2] [--skip-baseline] [--profile]

booksmith: its generation stage (GenerationClient, with the response cache and accounting on)
against EmbeddedServer (continuous batching, the prepared Q8_0 file) with `concurrency`
requests in flight; server start-up is not timed.
unconstrained: on the same server, the same requests without and with `response_format`
(SECTION_FORMAT: a textbook section as JSON), alternating for `rounds` rounds (ABBA) so that a
busy moment on the machine hits both; the figure is constrained tok/s over unconstrained tok/s.
--profile: the same requests on an in-process Engine, timing decode steps and sampling per
token without and with the grammar (no RESULT line).
baseline (llama_cpp_direct): the bundled Q4_1 file through llama-cpp-python's high-level
`Llama(...).create_chat_completion`, one request after another, as a user would drive it.
Both sides get the same prompts, sampling settings and max_tokens; the figure is generated
(completion) tokens per second of wall time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TOPICS = [
    "photosynthesis", "the French Revolution", "prime numbers", "plate tectonics",
    "the water cycle", "Newton's laws of motion", "supply and demand", "the immune system",
    "binary search", "the Roman Republic", "chemical bonding", "probability",
    "volcanoes", "the cell cycle", "electric circuits", "the printing press",
]  # fmt: skip

TEMPERATURE = 0.7
TOP_P = 0.95

# A textbook section as JSON: bounded and unbounded strings, an array, an enum. Per-token cost
# grows with the sequence, so both runs should reach max_tokens for a fair ratio.
SECTION_FORMAT: dict[str, Any] = {
    "type": "json_schema",
    "json_schema": {
        "name": "section",
        "schema": {
            "type": "object",
            "properties": {
                "title": {"type": "string", "minLength": 1, "maxLength": 80},
                "level": {"enum": ["introductory", "intermediate", "advanced"]},
                "paragraphs": {
                    "type": "array",
                    # long enough to run to max_tokens, as the plain answers do
                    "items": {"type": "string", "minLength": 240},
                    "minItems": 4,
                    "maxItems": 8,
                },
            },
            "required": ["title", "level", "paragraphs"],
            "additionalProperties": False,
        },
    },
}


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
    base_url: str,
    model: str,
    texts: list[str],
    concurrency: int,
    max_tokens: int,
    response_format: dict[str, Any] | None = None,
) -> Figure:
    """booksmith's own generation stage (GenerationClient: cache, limits, accounting on)."""
    fmt = json.dumps(response_format) if response_format else None
    import tempfile

    from booksmith.generation.cache import ResponseCache
    from booksmith.generation.client import Endpoint, GenerationClient
    from booksmith.schemas import GenerationRequest, Sampling

    requests = [
        GenerationRequest.build(
            messages=[{"role": "user", "content": text}],
            model=model,
            sampling=Sampling(max_tokens=max_tokens, temperature=TEMPERATURE, top_p=TOP_P, seed=i),
            response_format=fmt,
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


def run_booksmith(
    texts: list[str], concurrency: int, max_tokens: int, threads: int, rounds: int
) -> tuple[Figure, Figure]:
    """(unconstrained, constrained) on one server, summed over `rounds`, in ABBA order (u c,
    c u, ...) so that a machine speeding up or slowing down over the run favours neither."""
    from booksmith.generation.embedded import EmbeddedServer

    plain, constrained = Figure(0, 0.0), Figure(0, 0.0)
    with EmbeddedServer(n_parallel=concurrency, n_threads=threads) as server:
        for round_ in range(rounds):
            pair = [(plain, None), (constrained, SECTION_FORMAT)]
            for total, fmt in pair if round_ % 2 == 0 else pair[::-1]:
                figure = asyncio.run(
                    _booksmith_requests(
                        server.base_url, server.model_name, texts, concurrency, max_tokens, fmt
                    )
                )
                total.tokens += figure.tokens
                total.seconds += figure.seconds
                kind = "constrained" if fmt else "unconstrained"
                print(f"  {kind}: {figure.tokens} tokens, {figure.rate:.1f} tok/s", flush=True)
    return plain, constrained


class _Clock:
    """Times an in-process Engine's decode steps and its sampling per token (wraps methods)."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.reset()
        step, sample = engine._step, engine._sample

        def timed_step() -> None:
            started = time.perf_counter()
            step()
            self.step_s += time.perf_counter() - started

        def timed_sample(slot: Any) -> None:
            wide = engine.grammar_wide_passes
            started = time.perf_counter()
            sample(slot)
            spent = time.perf_counter() - started
            self.sample_s += spent
            self.tokens += 1
            if engine.grammar_wide_passes > wide:
                self.wide_passes += 1
                self.wide_pass_s += spent

        setattr(engine, "_step", timed_step)  # noqa: B010 (mypy: no assigning to a method)
        setattr(engine, "_sample", timed_sample)  # noqa: B010

    def reset(self) -> None:
        self.step_s = self.sample_s = self.wide_pass_s = 0.0
        self.tokens = self.wide_passes = 0

    def line(self, label: str) -> str:
        per = 1000 / max(self.tokens, 1)
        text = (
            f"{label}: {self.tokens} tokens, step {self.step_s * per:.2f} ms/token = "
            f"decode {(self.step_s - self.sample_s) * per:.2f} + sampling "
            f"{self.sample_s * per:.3f}"
        )
        if self.wide_passes:
            text += (
                f"; the grammar looked past the top-k on {self.wide_passes} tokens "
                f"({100 * self.wide_passes / max(self.tokens, 1):.1f}%), "
                f"{1000 * self.wide_pass_s / self.wide_passes:.2f} ms each"
            )
        return text


def profile(texts: list[str], concurrency: int, max_tokens: int, threads: int) -> None:
    """Where a token's time goes, in-process: the same requests without and with the grammar."""
    from booksmith.generation.embedded import prepared_model
    from booksmith.generation.embedded.engine import Engine, EngineConfig, SamplingParams
    from booksmith.generation.embedded.server import response_format_grammar

    grammar = response_format_grammar(SECTION_FORMAT)
    config = EngineConfig(n_parallel=concurrency, n_threads=threads)
    with Engine(prepared_model(), config) as engine:
        clock = _Clock(engine)
        for label, rule in (("unconstrained", None), ("constrained", grammar)):
            clock.reset()
            futures = [
                engine.submit_chat(
                    [{"role": "user", "content": text}],
                    SamplingParams(max_tokens, TEMPERATURE, TOP_P, seed=i, grammar=rule),
                )[0]
                for i, text in enumerate(texts)
            ]
            for future in futures:
                future.result()
            print(clock.line(label))


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
    parser.add_argument("--rounds", type=int, default=2, help="unconstrained/constrained pairs")
    parser.add_argument("--skip-baseline", action="store_true", help="only the structured run")
    parser.add_argument("--profile", action="store_true", help="in-process: where time goes")
    args = parser.parse_args(argv)

    from booksmith.generation.embedded import bundled_gguf

    texts = prompts(args.requests)
    print(
        f"{args.requests} requests, max_tokens={args.max_tokens}, "
        f"temperature={TEMPERATURE}, top_p={TOP_P}, threads={args.threads}"
    )
    if args.profile:
        profile(texts, args.concurrency, args.max_tokens, args.threads)
        return
    ours, constrained = run_booksmith(
        texts, args.concurrency, args.max_tokens, args.threads, args.rounds
    )
    print(
        f"booksmith (EmbeddedServer, Q8_0, {args.concurrency} in flight): "
        f"{ours.tokens} tokens in {ours.seconds:.1f} s = {ours.rate:.1f} tok/s"
    )
    print(
        f"booksmith constrained (json_schema SECTION_FORMAT, same server): "
        f"{constrained.tokens} tokens in {constrained.seconds:.1f} s = "
        f"{constrained.rate:.1f} tok/s"
    )
    ratio = constrained.rate / ours.rate if ours.rate > 0 else 0.0
    print(
        f"RESULT embedded_generation:unconstrained ratio={ratio:.2f} "
        f"constrained={constrained.rate:.1f} unconstrained={ours.rate:.1f} unit=tok/s"
    )
    if args.skip_baseline:
        return
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
