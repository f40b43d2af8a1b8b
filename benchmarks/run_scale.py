"""The whole `booksmith run` against the fake server, at growing sizes: memory and speed.

For each size N (requests), three measurements on the same plan and the same machine:

- generation alone: the run's generation stage (booksmith's client, same chunks, same
  `max_concurrency`) in this process against the fake server, no filtering;
- the rest alone: `booksmith run` with every answer already in its response cache, so the run
  is planning, documents, exact dedup, the quality chain, MinHash, the final pass and the
  shards;
- the pipeline: `booksmith run` on an empty cache, generation and filtering overlapped.

The rest alone and the pipeline run `--repeat` times each (default 2), alternating, and the
fastest of each counts: the machines are shared, and one slow spell in a single run of the
denominator moved the ratio by 0.08. Every run's docs/s is printed beside the best, and so is
the pipeline against the CPU bound (both stages' CPU seconds spread over all cores, which no
schedule beats).

Docs/s is requests over the run's own wall time (the manifest's `counts.chunks.wall_s`: from
the run's start to its last shard; the CLI's and Prefect's start-up, a fixed cost, excluded).
The ratio is the pipeline's docs/s over the slower of the two stages alone: 1.0 means the run
takes no longer than its slowest stage, 0.5 that the stages ran one after the other.

Memory is the peak of the summed RSS of `booksmith run`'s whole process tree (its filter
workers included), sampled every 0.2 s; the Prefect server runs outside it. The line per size
pair says how many bytes each additional request cost.

The fake server is the default one (600-word answers that pass the filters, distinct for every
request, no added latency), not `--fast` (whose identical replies would all be duplicates).

    python -m benchmarks.run_scale [--sizes 10000,100000] [--chunk 2000] [--concurrency 64]
                                   [--repeat 2]
    python -m benchmarks.run_scale --history 10 --sizes 4000   # runs into one output directory

`--history K` runs K nights of the first size into the same output directory (a new seed each,
so each adds its documents to the MinHash index) and prints each run's peak: with the index
queried through memory-mapped tables, the tenth peaks no higher than the second.

Ends with `RESULT run_scale:slowest_stage ratio=...` (the largest size) and one
`MEMORY run_scale n=... peak_mb=... docs_per_s=...` line per size.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import math
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import yaml

from tests.fakeserver import FakeServer

WORDS = 600  # words per answer, as in the probe
MAX_TOKENS = math.ceil(WORDS / 0.75)  # the fake server writes 0.75 words per max token
TOPICS = 79  # the bundled seed file


def config(base_url: str, out: Path, n: int, chunk: int, concurrency: int) -> dict[str, Any]:
    return {
        "seed": 11,
        "generation": {
            "backend": "openai",
            "base_url": base_url,
            "model": "fake-model",
            "max_concurrency": concurrency,
            "timeout_s": 30.0,
            "sampling": {"max_tokens": MAX_TOKENS},
        },
        "plan": {
            "limit": n,
            "samples_per_topic": math.ceil(n / TOPICS),
            "chunk_requests": chunk,
        },
        "fill": {"documents": None},
        "output": {"dir": str(out)},
    }


class PeakRSS:
    """Peak of the summed RSS of a process and all its descendants, sampled in a thread."""

    def __init__(self, pid: int, every_s: float = 0.2) -> None:
        self.proc, self.every_s, self.peak = psutil.Process(pid), every_s, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                procs = [self.proc, *self.proc.children(recursive=True)]
            except psutil.NoSuchProcess:
                return
            total = 0
            for p in procs:
                with contextlib.suppress(psutil.NoSuchProcess):
                    total += p.memory_info().rss
            self.peak = max(self.peak, total)
            time.sleep(self.every_s)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def cpu_children() -> float:
    """CPU seconds of every waited-for descendant so far (a run's workers included)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def booksmith_run(cfg_path: Path, env: dict[str, str]) -> tuple[Path, int, float, float]:
    """(version directory, peak RSS of the process tree, wall seconds of the process, CPU
    seconds of the process tree)."""
    started, cpu0 = time.perf_counter(), cpu_children()
    proc = subprocess.Popen(
        [sys.executable, "-m", "booksmith", "run", "--config", str(cfg_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    rss = PeakRSS(proc.pid)
    stdout, stderr = proc.communicate()
    peak = rss.stop()
    if proc.returncode != 0:
        raise SystemExit(f"booksmith run failed ({proc.returncode}):\n{stderr[-3000:]}")
    version = Path(stdout.strip().splitlines()[-1])
    return version, peak, time.perf_counter() - started, cpu_children() - cpu0


def generation_alone(cfg: dict[str, Any], cache_path: Path) -> float:
    """Seconds for the run's generation stage alone (same plan, chunks and concurrency)."""
    from booksmith.generation.backends import open_endpoints
    from booksmith.generation.cache import ResponseCache
    from booksmith.generation.client import GenerationClient
    from booksmith.generation.coverage import select_topics
    from booksmith.generation.seeds import load_seeds
    from booksmith.pipeline.rounds import Rounds
    from booksmith.schemas.config import RunConfig

    run_cfg = RunConfig.model_validate(cfg)
    seeds, _ = select_topics(load_seeds(run_cfg.topics), run_cfg.plan, run_cfg.output.dir)
    rounds = Rounds(seeds, run_cfg, run_cfg.seed or 0)
    cache = ResponseCache(cache_path)
    busy = 0.0
    with open_endpoints(run_cfg.generation, run_cfg.embedded) as endpoints:
        for chunk in rounds.first():
            client = GenerationClient(endpoints[0], cache=cache, run_id="bench")
            t0 = time.perf_counter()
            report = asyncio.run(client.run(chunk.plan))
            busy += time.perf_counter() - t0
            assert report.completed == len(chunk.plan), report.summary()
    cache.close()
    return busy


SERVER_PID: list[int] = []


def server_cpu() -> float:
    if not SERVER_PID:
        return 0.0
    times = psutil.Process(SERVER_PID[0]).cpu_times()
    return float(times.user + times.system)


def measure(
    n: int, chunk: int, concurrency: int, base_url: str, env: dict[str, str], tmp: Path,
    repeat: int,
) -> dict[str, Any]:  # fmt: skip
    """Generation alone once, then the rest alone and the pipeline `repeat` times each,
    alternating, so a slow spell of the shared machine hits both; the best of each counts."""
    root = tmp / f"n{n}"
    root.mkdir()
    # 1. generation alone, filling a response cache
    cache = root / "responses.sqlite"
    cfg = config(base_url, root / "gen", n, chunk, concurrency)
    server_cpu0, cpu0 = server_cpu(), time.process_time()
    gen_s = generation_alone(cfg, cache)
    gen_cpu = time.process_time() - cpu0 + server_cpu() - server_cpu0
    rests, pipes = [], []
    for attempt in range(repeat):
        rests.append(rest_alone(config(base_url, root / f"rest{attempt}", n, chunk, concurrency),
                                cache, env))  # fmt: skip
        pipes.append(pipeline(config(base_url, root / f"piped{attempt}", n, chunk, concurrency),
                              env))  # fmt: skip
    rest = min(rests, key=lambda r: r["wall_s"])
    piped = min(pipes, key=lambda r: r["wall_s"])
    return {
        "n": n,
        "kept": piped["kept"],
        "peak_mb": max(r["peak"] for r in pipes) / 2**20,
        "peak_rest_mb": max(r["peak"] for r in rests) / 2**20,
        "pipeline_s": piped["wall_s"],
        "process_s": piped["process_s"],
        "pipeline_runs_s": [r["wall_s"] for r in pipes],
        "generate_alone_s": gen_s,
        "rest_alone_s": rest["wall_s"],
        "rest_alone_runs_s": [r["wall_s"] for r in rests],
        "busy_s": piped["busy_s"],
        # CPU seconds (the fake server's included with generation): on 2 cores the pipeline
        # cannot take less than the sum over the cores
        "cpu_s": {"generate_alone": gen_cpu, "rest_alone": rest["cpu"], "pipeline": piped["cpu"]},
        "verified": True,
    }


def rest_alone(cfg: dict[str, Any], cache: Path, env: dict[str, str]) -> dict[str, Any]:
    """`booksmith run` with every answer already in its response cache (a copy of `cache`)."""
    out = Path(cfg["output"]["dir"])
    (out / "_state").mkdir(parents=True)
    shutil.copyfile(cache, out / "_state" / "responses.sqlite")
    cfg_path = out.with_suffix(".yaml")
    cfg_path.write_text(yaml.safe_dump(cfg))
    version, peak, _, cpu = booksmith_run(cfg_path, env)
    manifest = json.loads((version / "manifest.json").read_text())
    n = cfg["plan"]["limit"]
    assert manifest["counts"]["generate"]["cached"] == n, manifest["counts"]["generate"]
    shutil.rmtree(out)
    return {"peak": peak, "cpu": cpu, "wall_s": manifest["counts"]["chunks"]["wall_s"]}


def pipeline(cfg: dict[str, Any], env: dict[str, str]) -> dict[str, Any]:
    """`booksmith run` from an empty cache, generation and filtering overlapped; verified."""
    out = Path(cfg["output"]["dir"])
    cfg_path = out.with_suffix(".yaml")
    cfg_path.write_text(yaml.safe_dump(cfg))
    server_cpu0 = server_cpu()
    version, peak, process_s, cpu = booksmith_run(cfg_path, env)
    cpu += server_cpu() - server_cpu0
    manifest = json.loads((version / "manifest.json").read_text())
    verify = subprocess.run(
        [sys.executable, "-m", "booksmith", "verify", str(version)],
        capture_output=True, text=True, env=env,
    )  # fmt: skip
    assert verify.returncode == 0, verify.stdout + verify.stderr
    chunks = manifest["counts"]["chunks"]
    shutil.rmtree(out)
    return {
        "peak": peak,
        "cpu": cpu,
        "wall_s": chunks["wall_s"],
        "process_s": process_s,  # the CLI's start-up included, as in its CPU seconds
        "busy_s": chunks["busy_s"],
        "kept": manifest["documents"],
    }


def history(n: int, nights: int, chunk: int, concurrency: int, base_url: str,
            env: dict[str, str], tmp: Path) -> list[float]:  # fmt: skip
    """Peak RSS (MB) of each of `nights` runs into one output directory."""
    out = tmp / "history"
    peaks = []
    for night in range(nights):
        cfg = config(base_url, out, n, chunk, concurrency)
        cfg["seed"] = 100 + night
        path = tmp / f"night{night}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        version, peak, _, _ = booksmith_run(path, env)
        manifest = json.loads((version / "manifest.json").read_text())
        peaks.append(peak / 2**20)
        index = out / "_state" / "minhash"
        index_mb = sum(p.stat().st_size for p in index.rglob("*") if p.is_file()) >> 20
        print(f"night {night + 1}: peak RSS {peaks[-1]:.0f} MB, kept {manifest['documents']}, "
              f"index on disk {index_mb} MB", flush=True)  # fmt: skip
    return peaks


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="10000,100000")
    parser.add_argument("--chunk", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=2, help="runs of the rest and the pipeline")
    parser.add_argument("--history", type=int, default=0, help="nights into one output dir")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    cores = os.cpu_count()
    print(f"machine: {platform.machine()}, {cores} cores, Python {platform.python_version()}")

    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # telemetry: offline
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with (
        prefect_test_harness(server_startup_timeout=180),
        FakeServer() as server,
        tempfile.TemporaryDirectory() as tmp,
    ):
        env = {**os.environ, "PREFECT_API_URL": str(PREFECT_API_URL.value()), "TERM": "dumb"}
        assert server._proc is not None
        SERVER_PID.append(server._proc.pid)
        if args.history:
            peaks = history(sizes[0], args.history, args.chunk, args.concurrency,
                            server.base_url, env, Path(tmp))  # fmt: skip
            second, last = peaks[min(1, len(peaks) - 1)], peaks[-1]
            print(f"MEMORY run_scale history nights={args.history} n={sizes[0]} "
                  f"second_mb={second:.0f} last_mb={last:.0f}")  # fmt: skip
            return
        results = []
        for n in sizes:
            r = measure(n, args.chunk, args.concurrency, server.base_url, env, Path(tmp),
                        args.repeat)  # fmt: skip
            slowest = max(r["generate_alone_s"], r["rest_alone_s"])
            r["ratio"] = slowest / r["pipeline_s"]
            results.append(r)
            busy = ", ".join(f"{k} {v:.1f}" for k, v in r["busy_s"].items())
            cpu = ", ".join(f"{k} {v:.0f}" for k, v in r["cpu_s"].items())
            # no schedule on `cores` cores beats the CPU both stages need, spread over all cores
            # (CPU of whole processes, start-up included, so against the process's wall time)
            bound_s = (r["cpu_s"]["generate_alone"] + r["cpu_s"]["rest_alone"]) / (cores or 1)
            runs = "; ".join(
                f"{name} " + ", ".join(f"{n / s:.0f}" for s in r[key])
                for name, key in (("pipeline", "pipeline_runs_s"), ("rest", "rest_alone_runs_s"))
            )
            print(
                f"n={n}: pipeline {n / r['pipeline_s']:.0f} docs/s ({r['pipeline_s']:.1f} s), "
                f"generation alone {n / r['generate_alone_s']:.0f} docs/s, rest alone "
                f"{n / r['rest_alone_s']:.0f} docs/s; ratio to slowest {r['ratio']:.2f}; "
                f"CPU bound on {cores} cores {bound_s:.0f} s, the run's process took "
                f"{r['process_s']:.0f} s ({bound_s / r['process_s']:.0%}); "
                f"each run, docs/s: {runs}; "
                f"peak RSS {r['peak_mb']:.0f} MB (all cached: {r['peak_rest_mb']:.0f} MB); "
                f"kept {r['kept']}; busy s: {busy}; CPU s: {cpu}",
                flush=True,
            )
    for a, b in itertools.pairwise(results):
        per = (b["peak_mb"] - a["peak_mb"]) * 2**20 / (b["n"] - a["n"])
        print(f"memory: {a['n']} -> {b['n']} requests: {per:.0f} bytes per additional request")
    for r in results:
        print(
            f"MEMORY run_scale n={r['n']} peak_mb={r['peak_mb']:.0f} "
            f"docs_per_s={r['n'] / r['pipeline_s']:.0f}"
        )
    last = results[-1]
    print(
        f"RESULT run_scale:slowest_stage ratio={last['ratio']:.3f} "
        f"booksmith={last['n'] / last['pipeline_s']:.1f} "
        f"baseline={last['n'] / max(last['generate_alone_s'], last['rest_alone_s']):.1f} "
        "unit=docs/s"
    )


if __name__ == "__main__":
    main()
