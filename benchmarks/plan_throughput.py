"""Plan throughput: requests planned per second against the generation stage's own overhead.

Planning must never be the bottleneck: it should plan requests far faster than the generation
stage can even dispatch them to an infinitely fast endpoint. The baseline `generation_overhead`
is booksmith's generation client against the fake server in fast mode (a fixed reply, so only
the client's own per-request cost is measured), in the same process. A second baseline,
`render_each`, renders and builds every planned request the plain way (one sandboxed Jinja
render and GenerationRequest.build each, as the plan did before it spliced): the plan's output
is checked equal to it on a sample.

Two shapes of a million requests: `deep`, the 79 default topics with ~12,700 samples each, and
`wide`, ~20,000 topics (each default topic split into 254 subtopics) with 50 samples each, the
scale of Phi-1.5's topic list.

    python -m benchmarks.plan_throughput [--requests 1000000] [--generation-requests 5000]

Ends with `RESULT plan_throughput:generation_overhead ratio=<plan/generation> ...` (req/s).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import math
import tempfile
import time
import tracemalloc
from pathlib import Path

from booksmith.generation.plan import build_plan
from booksmith.generation.seeds import load_seeds
from booksmith.prompts import PromptLibrary
from booksmith.schemas import GenerationRequest, Sampling, TopicSeed
from booksmith.schemas.arrow import to_table

WIDE_SAMPLES = 50


def bytes_per_request(shape: str, n: int = 20_000) -> float:
    """Memory held by a plan of n requests, per request (tracemalloc: slow, so a small plan)."""
    seeds, per_topic = topics(shape, n)
    library = PromptLibrary()
    tracemalloc.start()
    plan = build_plan(
        seeds, library, model="m", sampling=Sampling(), seed=1, samples_per_topic=per_topic
    )
    held = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    return held / len(plan)


def topics(shape: str, n: int) -> tuple[list[TopicSeed], int]:
    seeds = load_seeds()
    if shape == "deep":
        return seeds, math.ceil(n / len(seeds))
    per = math.ceil(n / WIDE_SAMPLES / len(seeds))
    wide = [
        TopicSeed(topic=f"{s.topic}, part {j + 1}", subject=s.subject, path=[*s.path, s.topic])
        for s in seeds
        for j in range(per)
    ]
    return wide, WIDE_SAMPLES


def plan_rate(shape: str, n: int) -> tuple[float, list[GenerationRequest], list[TopicSeed]]:
    seeds, per_topic = topics(shape, n)
    library = PromptLibrary()
    gc.collect()
    started = time.perf_counter()
    plan = build_plan(
        seeds, library, model="m", sampling=Sampling(), seed=1, samples_per_topic=per_topic
    )
    return len(plan) / (time.perf_counter() - started), plan, seeds


def render_each_rate(plan: list[GenerationRequest], seeds: list[TopicSeed], n: int) -> float:
    """Render and build the first n requests one by one; assert they equal the plan's. The
    collector is paused as the plan pauses it: a million live requests would slow it down."""
    from tests.plan_reference import rebuild_plainly

    gc.disable()
    started = time.perf_counter()
    rebuilt = rebuild_plainly(plan[:n], seeds, PromptLibrary(), model="m", sampling=Sampling())
    rate = n / (time.perf_counter() - started)
    gc.enable()
    assert rebuilt == plan[:n], "the plan differs from rendering each request"
    return rate


def write_seconds(plan: list[GenerationRequest]) -> float:
    """plan.parquet as the dataset writes it: records to Arrow, then ZSTD Parquet, sha256."""
    from booksmith.shards.files import write_table_atomically

    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        root = Path(tmp)
        write_table_atomically(to_table(plan, GenerationRequest), root / "plan.parquet")
        return time.perf_counter() - started


async def generation_rate(n: int) -> float:
    from benchmarks.client_overhead import booksmith
    from tests.fakeserver import FakeServer

    with FakeServer(fast=True) as server, tempfile.TemporaryDirectory() as tmp:
        return await booksmith(server.base_url, "plan-bench", n, 256, Path(tmp))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=1_000_000)
    parser.add_argument("--render-each", type=int, default=50_000, help="baseline sample size")
    parser.add_argument("--generation-requests", type=int, default=5_000)
    args = parser.parse_args(argv)
    rates = {}
    for shape in ("deep", "wide"):
        rate, plan, seeds = plan_rate(shape, args.requests)
        written = write_seconds(plan)
        slow = render_each_rate(plan, seeds, min(args.render_each, len(plan)))
        print(
            f"plan {shape}: {len(plan):,} requests over {len(seeds):,} topics in "
            f"{len(plan) / rate:.1f} s ({rate:,.0f} req/s), plan.parquet written in "
            f"{written:.1f} s; rendering each request: {slow:,.0f} req/s ({rate / slow:.1f}x)",
            flush=True,
        )
        print(
            f"RESULT plan_throughput:render_each shape={shape} ratio={rate / slow:.2f} "
            f"booksmith={rate:.0f} baseline={slow:.0f} unit=req/s",
            flush=True,
        )
        rates[shape] = rate
        del plan
        print(f"memory {shape}: {bytes_per_request(shape) / 1024:.1f} KiB per planned request")
    gen = asyncio.run(generation_rate(args.generation_requests))
    print(f"generation stage overhead alone: {gen:,.0f} req/s", flush=True)
    plan_rate_ = min(rates.values())
    print(
        f"RESULT plan_throughput:generation_overhead ratio={plan_rate_ / gen:.1f} "
        f"booksmith={plan_rate_:.0f} baseline={gen:.0f} unit=req/s"
    )


if __name__ == "__main__":
    main()
