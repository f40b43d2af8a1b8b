"""Plan throughput: requests planned per second against the generation stage's own overhead.

Planning must never be the bottleneck: it should plan requests far faster than the generation
stage can even dispatch them to an infinitely fast endpoint. The baseline `generation_overhead`
is booksmith's generation client against the fake server in fast mode (a fixed reply, so only
the client's own per-request cost is measured), in the same process.

    python -m benchmarks.plan_throughput [--requests 1000000] [--generation-requests 5000]

Ends with `RESULT plan_throughput:generation_overhead ratio=<plan/generation> ...` (req/s).
"""

from __future__ import annotations

import argparse
import asyncio
import math
import tempfile
import time
from pathlib import Path

from generation.plan import build_plan
from generation.seeds import load_seeds
from prompts import PromptLibrary
from schemas import Sampling


def plan_rate(n: int) -> tuple[float, int]:
    seeds = load_seeds()
    library = PromptLibrary()
    per_topic = math.ceil(n / len(seeds))
    started = time.perf_counter()
    plan = build_plan(
        seeds, library, model="m", sampling=Sampling(), seed=1, samples_per_topic=per_topic
    )
    elapsed = time.perf_counter() - started
    return len(plan) / elapsed, len(plan)


async def generation_rate(n: int) -> float:
    from benchmarks.client_overhead import booksmith
    from tests.fakeserver import FakeServer

    with FakeServer(fast=True) as server, tempfile.TemporaryDirectory() as tmp:
        return await booksmith(server.base_url, "plan-bench", n, 256, Path(tmp))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=1_000_000)
    parser.add_argument("--generation-requests", type=int, default=5_000)
    args = parser.parse_args(argv)
    plan, planned = plan_rate(args.requests)
    print(f"plan: {planned} requests at {plan:,.0f} req/s ({planned / plan:.1f} s)", flush=True)
    gen = asyncio.run(generation_rate(args.generation_requests))
    print(f"generation stage overhead alone: {gen:,.0f} req/s", flush=True)
    print(
        f"RESULT plan_throughput:generation_overhead ratio={plan / gen:.1f} "
        f"booksmith={plan:.0f} baseline={gen:.0f} unit=req/s"
    )


if __name__ == "__main__":
    main()
