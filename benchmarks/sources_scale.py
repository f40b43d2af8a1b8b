"""Planning a grounded run from a large source: speed and memory at two source sizes.

Writes a synthetic JSONL source of N passages (records of one to five paragraphs of English
sentences drawn, by a seeded bigram walk, from the words of Python's own documentation in
`pydoc_data`; each record sized to one passage under the default window of 64 to 512 tokens,
so the source holds exactly N passages), then plans a grounded run from it in a subprocess:
what `booksmith run --sources FILE` does before its first request and while it plans its
chunks, without generating (the planner does not need the model):

- the estimate: `flows.nightly.announce_estimate`'s calls (the first round's plan, its
  tokens and dollars), and
- the run's first round: `pipeline.rounds.Rounds.first()` on the estimate's plan replayed,
  chunk after chunk, as the run takes them (requests built and dropped, as generation would
  drop them).

Both sizes plan the same number of requests (`--requests`, a plan.limit), so what grows with
the source is reading and cutting it; peak RSS is the subprocess's own (`ru_maxrss`, the
planner runs in one process), and the line per size pair says what each additional passage
cost in memory. Passages/s and MB/s are over the whole planning wall time, both phases.

    python -m benchmarks.sources_scale [--passages 100000] [--small 10000] [--requests 10000]
    python -m benchmarks.sources_scale --passages 1000000 --small 100000

Ends with one `MEMORY sources_scale passages=... peak_mb=... passages_per_s=...` line per size
and `RESULT sources_scale:small_source ratio=<small peak / large peak> ...` (1.0: memory does
not grow with the source).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import random
import re
import resource
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

WORDS = (75, 300)  # words per record: one passage of 64..512 tokens (checked by the planner)
SEED = 11


def sentences(seed: int, count: int) -> list[str]:
    """`count` English sentences from a bigram walk over pydoc's prose (words and commas)."""
    import pydoc_data.topics

    text = " ".join(pydoc_data.topics.topics.values())
    tokens = re.findall(r"[A-Za-z][a-z]+|[.,]", text)
    follow: dict[str, list[str]] = defaultdict(list)
    for a, b in itertools.pairwise(tokens):
        follow[a.lower()].append(b)
    starts = [b for a, b in itertools.pairwise(tokens) if a == "." and b != "."]
    rng = random.Random(seed)
    out = []
    while len(out) < count:
        word = rng.choice(starts)
        words = [word.capitalize()]
        while len(words) < 28:
            nxt = rng.choice(follow[word.lower()] or ["."])
            if nxt == "." or (nxt == "," and words[-1].endswith(",")):
                break
            if nxt == ",":
                words[-1] += ","
            else:
                words.append(nxt.lower())
            word = nxt
        if len(words) >= 6:
            out.append(" ".join(words).rstrip(",") + ".")
    return out


def write_source(path: Path, passages: int, seed: int = SEED) -> int:
    """A JSONL source of `passages` one-passage records; returns its size in bytes."""
    pool = sentences(seed, 50_000)
    rng = random.Random(seed + 1)
    with path.open("w", encoding="utf-8") as f:
        for i in range(passages):
            target = rng.randint(*WORDS)
            paragraphs, words = [], 0
            per = target / rng.randint(1, 5)
            while words < target:
                paragraph, n = [], 0
                while n < per and words + n < target:
                    s = pool[rng.randrange(len(pool))]
                    paragraph.append(s)
                    n += s.count(" ") + 1
                paragraphs.append(" ".join(paragraph))
                words += n
            record = {"id": f"doc-{i:07d}", "text": "\n\n".join(paragraphs),
                      "license": "CC-BY-4.0", "title": f"extract {i}"}  # fmt: skip
            f.write(json.dumps(record) + "\n")
    return path.stat().st_size


def child(cfg_path: str) -> None:
    """Plan as the run does (the estimate, then the first round's chunks); print one JSON
    line with the phases' times, the plan's account and this process's peak RSS."""
    from booksmith.flows.nightly import first_round
    from booksmith.generation.estimate import estimate
    from booksmith.pipeline.grounded import MixedPlan
    from booksmith.pipeline.rounds import Rounds
    from booksmith.schemas.config import load_config

    cfg = load_config(Path(cfg_path))
    seed = cfg.seed or 0
    t0 = time.perf_counter()
    # announce_estimate's calls (it logs through Prefect, so it needs a flow run)
    grounded = MixedPlan(cfg, [], seed)
    est = estimate(first_round(cfg, [], seed, grounded), cfg, 0)
    t1 = time.perf_counter()
    rounds = Rounds([], cfg, seed, grounded=grounded.again())  # as StreamingRun makes it
    requests = sum(len(chunk.plan) for chunk in rounds.first())
    t2 = time.perf_counter()
    assert rounds.grounded is not None
    account = rounds.grounded.account()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"estimate_s": t1 - t0, "plan_s": t2 - t1, "estimated": est.requests,
                      "requests": requests, "account": account, "peak": peak}))  # fmt: skip


def measure(source: Path, out: Path, requests: int) -> dict[str, Any]:
    cfg = {
        "seed": SEED,
        "output": {"dir": str(out)},
        "plan": {"limit": requests},
        "sources": [{"path": str(source)}],
    }
    cfg_path = out.parent / f"{out.name}.json"
    cfg_path.write_text(json.dumps(cfg))
    env = {**os.environ, "PREFECT_LOGGING_LEVEL": "WARNING"}
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.sources_scale", "--child", str(cfg_path)],
        capture_output=True, text=True, env=env, check=False,
    )  # fmt: skip
    wall = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"planner failed:\n{done.stderr[-4000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    result["wall_s"] = wall
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--passages", type=int, default=100_000, help="the large source")
    parser.add_argument("--small", type=int, default=10_000, help="the small source")
    parser.add_argument("--requests", type=int, default=10_000, help="plan.limit at both sizes")
    parser.add_argument("--keep", default=None, help="a folder to keep the sources in (reused)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child)
        return
    print(f"python {platform.python_version()}, {os.cpu_count()} cores, "
          f"load {os.getloadavg()[0]:.2f}")  # fmt: skip
    tmp = Path(args.keep or tempfile.mkdtemp(prefix="sources_scale-"))
    tmp.mkdir(parents=True, exist_ok=True)
    rows = []
    for n in (args.small, args.passages):
        source = tmp / f"source-{n}.jsonl"
        if not source.is_file():
            started = time.perf_counter()
            write_source(source, n)
            print(f"wrote {n:,} passages in {time.perf_counter() - started:.0f} s")
        size = source.stat().st_size
        load = os.getloadavg()[0]
        r = measure(source, tmp / f"out-{n}-{time.time_ns()}", args.requests)
        acc = r["account"][source.name]
        assert acc["passages"] == n, f"{acc['passages']} passages, expected {n}"
        planning = r["estimate_s"] + r["plan_s"]
        row = {"n": n, "mb": size / 1e6, "peak_mb": r["peak"] / 1e6, "planning_s": planning,
               "passages_per_s": n / planning, "mb_per_s": size / 1e6 / planning,
               "estimate_s": r["estimate_s"], "plan_s": r["plan_s"], "requests": r["requests"],
               "candidates": acc.get("candidates", 0), "load": load}  # fmt: skip
        rows.append(row)
        print(f"{n:>9,} passages {row['mb']:7.0f} MB: estimate {r['estimate_s']:6.1f} s, "
              f"first round {r['plan_s']:6.1f} s, {row['passages_per_s']:7,.0f} passages/s, "
              f"{row['mb_per_s']:5.2f} MB/s, {r['requests']:,} requests "
              f"({row['candidates']:,} candidates gated), peak RSS {row['peak_mb']:,.0f} MB "
              f"(load {load:.2f})")  # fmt: skip
        if not args.keep:
            source.unlink()
    for row in rows:
        print(
            f"MEMORY sources_scale passages={row['n']} peak_mb={row['peak_mb']:.0f} "
            f"passages_per_s={row['passages_per_s']:.0f} mb_per_s={row['mb_per_s']:.2f}"
        )
    small, large = rows
    per = (large["peak_mb"] - small["peak_mb"]) * 1e6 / (large["n"] - small["n"])
    print(f"memory: {per:.1f} bytes per additional passage between {small['n']:,} and "
          f"{large['n']:,}")  # fmt: skip
    print(
        f"RESULT sources_scale:small_source ratio={small['peak_mb'] / large['peak_mb']:.3f} "
        f"booksmith={large['peak_mb']:.0f} baseline={small['peak_mb']:.0f} unit=MB"
    )


if __name__ == "__main__":
    main()
