"""`booksmith view` on a large version: does a page answer in under a second, and does the
server's memory stay flat?

Writes a synthetic version of N documents (default 1,000,000) of about 600 words each (Zipf-
distributed words from a 30,000-word vocabulary; 8% rejected, a third of those near-duplicates
with their evidence; a plan row per document) with the project's own shard writers and a
manifest, then starts the real command (`python -m booksmith view`) on it and requests each
page kind R times over HTTP from this process (a new page each time where the page has a
parameter: a different offset, document, filter value or search word):

- versions, the version page (funnel, quality, coverage), the topic tree, rejects by reason;
- documents: the first page, pages deep in the version, filtered by audience, by audience and
  format, by a quality range, by topic, the rejected list by reason;
- a document (by the link's place hint, and by id alone), a near-duplicate with its pair;
- full-text search: the first page for a common and a rare word, filtered too, after the index
  is built once (its build time is reported separately, and kept outside the version).

The first request of a page kind is counted (a version opened cold is what a user waits for);
p50 and p95 are over R requests. Memory is the server's RSS at the start, after the pages,
after the searches (the index is built in a child process), and after every page and search
is requested R times again: flat memory means the last two agree.

    python -m benchmarks.viewer_scale [--documents 1000000] [--repeats 10] [--dir DIR] [--keep]

Ends with one `RESULT viewer_scale:<page> p95_ms=... p50_ms=...` line per page kind, then
`RESULT viewer_scale:index build_s=...` and `MEMORY viewer_scale rss_mb_start=... rss_mb_end=...`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pyarrow as pa

from booksmith.schemas import Document, GenerationRequest, Rejected
from booksmith.schemas.arrow import arrow_schema
from booksmith.schemas.manifest import Counts, Manifest
from booksmith.shards.dataset import SingleFileWriter, commit_manifest
from booksmith.shards.writer import ROW_GROUP_ROWS, ShardWriter

WORDS = 600
VOCAB = 30_000
AXES = {
    "audience": ["young_children", "high_school", "college", "researchers", "general"],
    "style": ["concise", "narrative", "socratic", "formal"],
    "format": ["textbook_section", "exercises", "tutoring_dialogue", "blog_post", "faq"],
}
SAMPLING = {"max_tokens": 900, "temperature": 0.8, "top_p": 0.95, "frequency_penalty": None,
            "presence_penalty": None}  # fmt: skip
SUBJECTS = ["Mathematics", "Biology", "History", "Chemistry", "Computer science", "Economics"]


def vocabulary(rng: random.Random) -> list[str]:
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = {"".join(rng.choices(letters, k=rng.randint(2, 11))) for _ in range(VOCAB * 2)}
    return sorted(words)[:VOCAB]


def topics() -> list[list[str]]:
    return [
        [s, f"{s} unit {u}", f"{s} unit {u} lesson {k}"]
        for s in SUBJECTS
        for u in range(8)
        for k in range(20)
    ]


def batch(
    start: int, n: int, vocab: np.ndarray, rng: np.random.Generator, paths: list[list[str]]
) -> dict:
    """Columns of n documents (ids start..start+n-1): Zipf words, axes, topics, scores."""
    ranks = np.minimum(rng.zipf(1.3, size=(n, WORDS)), VOCAB) - 1
    texts = [" ".join(row) for row in vocab[ranks].tolist()]
    topic = rng.integers(0, len(paths), n).tolist()
    cols = {
        "id": [f"{i:032x}" for i in range(start, start + n)],
        "text": texts,
        "topic_path": [paths[t] for t in topic],
        "topic": [paths[t][-1] for t in topic],
        "subject": [paths[t][0] for t in topic],
        "quality_score": rng.random(n).round(4).tolist(),
    }
    for axis, values in AXES.items():
        cols[axis] = [values[k] for k in rng.integers(0, len(values), n).tolist()]
    return cols


def document_table(cols: dict, run_id: str, created: datetime) -> pa.Table:
    n = len(cols["id"])
    data = {
        **cols,
        "text_sha256": ["0" * 64] * n,
        "seed_words": [["alpha", "beta"]] * n,
        "prompt": [f"Write about {t}." for t in cols["topic"]],
        "model": ["synthetic"] * n,
        "backend": ["benchmark"] * n,
        "sampling": ['{"max_tokens":900}'] * n,
        "seed": list(range(n)),
        "sample_index": [0] * n,
        "finish_reason": ["stop"] * n,
        "truncated": [False] * n,
        "n_tokens": [800] * n,
        "lang": ["en"] * n,
        "lang_score": [0.99] * n,
        "run_id": [run_id] * n,
        "created_at": [created] * n,
    }
    schema = arrow_schema(Document)
    return pa.table({name: data[name] for name in schema.names}, schema=schema)


def plan_table(cols: dict) -> pa.Table:
    n = len(cols["id"])
    schema = arrow_schema(GenerationRequest)
    data = {
        "id": cols["id"],
        "model": ["synthetic"] * n,
        "messages": [
            [{"role": "user", "content": f"Write a lesson on {t}."}] for t in cols["topic"]
        ],
        "sampling": [dict(SAMPLING, seed=i) for i in range(n)],
        "sample_index": [0] * n,
        "topic": cols["topic"],
        "topic_path": cols["topic_path"],
        "subject": cols["subject"],
        "audience": cols["audience"],
        "style": cols["style"],
        "format": cols["format"],
        "seed_words": [["alpha", "beta"]] * n,
        "template": ["textbook"] * n,
        "response_format": [None] * n,
    }
    return pa.table({name: data[name] for name in schema.names}, schema=schema)


def write_version(root: Path, documents: int, seed: int = 0) -> tuple[str, float]:
    """A version of `documents` rows (kept and rejected) with a manifest; (run id, seconds)."""
    start = time.perf_counter()
    run_id = "20261205T000000Z"
    path = root / run_id
    path.mkdir(parents=True)
    rng, prng = np.random.default_rng(seed), random.Random(seed)
    vocab, paths = np.array(vocabulary(prng), dtype=object), topics()
    created = datetime(2026, 12, 5, tzinfo=UTC)
    text = ShardWriter(path, "text", arrow_schema(Document), kind="text")
    rejected = ShardWriter(path, "rejected", arrow_schema(Rejected), kind="rejected")
    plan = SingleFileWriter(path, "plan.parquet", GenerationRequest, kind="plan")
    kept_ids: list[str] = []
    reasons = {"dedup_minhash": 0, "quality_rule:stop_words": 0, "truncated:finish_length": 0}
    for first in range(0, documents, ROW_GROUP_ROWS):
        cols = batch(first, min(ROW_GROUP_ROWS, documents - first), vocab, rng, paths)
        table = document_table(cols, run_id, created)
        plan.write_table(plan_table(cols))
        drop = rng.random(table.num_rows) < 0.08
        text.write(table.filter(pa.array(~drop)))
        kept_ids += [cols["id"][i] for i in np.flatnonzero(~drop[:50]).tolist()]
        rej = table.filter(pa.array(drop))
        names = [list(reasons)[k] for k in rng.integers(0, 3, rej.num_rows).tolist()]
        for name in names:
            reasons[name] += 1
        dup = [prng.choice(kept_ids) if r == "dedup_minhash" else None for r in names]
        detail = [json.dumps({"matched_run": run_id, "jaccard": 0.9}) if d else None for d in dup]
        rej = rej.append_column("reason", pa.array(names, pa.string()))
        rej = rej.append_column("duplicate_of", pa.array(dup, pa.string()))
        rejected.write(rej.append_column("detail", pa.array(detail, pa.string())))
    shards = [*text.close(), *rejected.close(), plan.close()]
    kept = sum(s.rows for s in shards if s.kind == "text")
    counts = Counts.model_validate(
        {
            "generate": {"planned": documents, "completed": documents},
            "filter": {"all": {"input": documents, "kept": kept, **reasons}},
            "kept": kept,
            "rejected": documents - kept,
        }
    )
    manifest = Manifest(run_id=run_id, shards=shards, counts=counts, documents=kept)
    commit_manifest(path, manifest)
    return run_id, time.perf_counter() - start


class Server:
    """The real command, on a free port."""

    def __init__(self, out: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "booksmith", "view", str(out)],
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert self.proc.stdout is not None
        self.url = self.proc.stdout.readline().strip().rstrip("/")
        self.ps = psutil.Process(self.proc.pid)

    def rss_mb(self) -> float:
        return self.ps.memory_info().rss / 2**20

    def get(self, path: str, **params: object) -> tuple[float, bytes]:
        query = ("?" + urllib.parse.urlencode(params)) if params else ""
        start = time.perf_counter()
        with urllib.request.urlopen(self.url + path + query, timeout=600) as r:
            body = r.read()
        return (time.perf_counter() - start) * 1000, body

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


def measure(name: str, repeats: int, call: Callable[[int], Any], results: dict) -> None:
    times = [call(k)[0] for k in range(repeats)]
    results[name] = times
    p50, p95 = statistics.median(times), float(np.percentile(times, 95))
    print(f"{name:28} first {times[0]:8.1f} ms   p50 {p50:8.1f}   p95 {p95:8.1f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--documents", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument(
        "--dir", type=Path, help="where to write the output (default: a temporary folder)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the output afterwards")
    args = parser.parse_args()
    root = args.dir or Path(tempfile.mkdtemp(prefix="viewer-scale-"))
    out = root / "out"
    load = os.getloadavg()[0]
    print(
        f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"load {load:.1f}; {args.documents:,} documents in {out}",
        flush=True,
    )
    try:
        if (out / "20261205T000000Z" / "manifest.json").exists():
            run = "20261205T000000Z"
            print("reusing the version already written there")
        else:
            run, seconds = write_version(out, args.documents)
            size = sum(f.stat().st_size for f in (out / run).rglob("*") if f.is_file())
            print(f"version written in {seconds:.0f} s, {size / 2**30:.2f} GiB", flush=True)
        run_pages(out, run, args.repeats)
    finally:
        if not args.keep and args.dir is None:
            shutil.rmtree(root, ignore_errors=True)


def run_pages(out: Path, run: str, repeats: int) -> None:
    import pyarrow.parquet as pq

    kept = pq.ParquetFile(next((out / run / "text").glob("*.parquet")))
    ids = kept.read_row_group(0, columns=["id"]).column("id").to_pylist()
    rej = pq.ParquetFile(next((out / run / "rejected").glob("*.parquet"))).read_row_group(0)
    near = [
        r["id"] for r in rej.select(["id", "reason"]).to_pylist() if r["reason"] == "dedup_minhash"
    ]
    total = json.loads((out / run / "manifest.json").read_text())["documents"]
    pages = max(total // 50, 1)
    server = Server(out)
    rss = {"start": server.rss_mb()}
    results: dict[str, list[float]] = {}
    v = f"/v/{run}"
    audiences, formats, lesson = AXES["audience"], AXES["format"], topics()
    pages_before: dict[str, Callable[[int], Any]] = {
        "versions": lambda k: server.get("/", all=1),
        "version": lambda k: server.get(v),
        "docs_first_page": lambda k: server.get(f"{v}/docs"),
        "docs_deep_page": lambda k: server.get(f"{v}/docs", page=pages // (k + 2)),
        "docs_by_audience": lambda k: server.get(
            f"{v}/docs", audience=audiences[k % 5], page=1 + 37 * k
        ),
        "docs_by_audience_format": lambda k: server.get(
            f"{v}/docs", audience=audiences[k % 5], format=formats[(k + 1) % 5], page=1 + k
        ),
        "docs_by_quality": lambda k: server.get(
            f"{v}/docs", qmin=k / 20, qmax=k / 20 + 0.1, page=1 + k
        ),
        "docs_by_topic": lambda k: server.get(f"{v}/docs", topic=lesson[k * 7][-1]),
        "rejected_by_reason": lambda k: server.get(
            f"{v}/docs", kind="rejected", reason="dedup_minhash", page=1 + k
        ),
        "document_by_link": lambda k: server.get(f"{v}/doc/{ids[k]}", at=f"t0-{k}"),
        "document_by_id": lambda k: server.get(f"{v}/doc/{ids[100 + k]}"),
        "near_duplicate_pair": lambda k: server.get(f"{v}/doc/{near[k]}"),
        "rejects": lambda k: server.get(f"{v}/rejects"),
        "topics": lambda k: server.get(f"{v}/topics"),
    }
    vocab = vocabulary(random.Random(0))
    common, rare = vocab[:40], vocab[5000:5040]
    searches: dict[str, Callable[[int], Any]] = {
        "search_common_word": lambda k: server.get(f"{v}/docs", text=common[k]),
        "search_rare_word": lambda k: server.get(f"{v}/docs", text=rare[k]),
        "search_two_words_filtered": lambda k: server.get(
            f"{v}/docs", text=f"{common[k]} {rare[k]}", audience=audiences[k % 5]
        ),
    }
    try:
        for name, call in pages_before.items():
            measure(name, repeats, call, results)
        rss["pages"] = server.rss_mb()
        start = time.perf_counter()
        while b'id="building"' in server.get(f"{v}/docs", text="start")[1]:
            time.sleep(2)
        build_s = time.perf_counter() - start
        index = next((out / "_state" / "view" / run).glob("search-*.sqlite"))
        gib = index.stat().st_size / 2**30
        print(f"search index built in {build_s:.0f} s, {gib:.2f} GiB (outside the version)")
        for name, call in searches.items():
            measure(name, repeats, call, results)
        rss["searches"] = server.rss_mb()
        for call in [*pages_before.values(), *searches.values()]:  # again: does memory grow?
            for k in range(repeats):
                call(k)
        rss["end"] = server.rss_mb()
    finally:
        server.close()
    for name, times in results.items():
        p50, p95 = statistics.median(times), np.percentile(times, 95)
        print(
            f"RESULT viewer_scale:{name} p95_ms={p95:.0f} p50_ms={p50:.0f} "
            f"first_ms={times[0]:.0f} n={len(times)}"
        )
    print(f"RESULT viewer_scale:index build_s={build_s:.0f}")
    print("MEMORY viewer_scale " + " ".join(f"rss_mb_{k}={v:.0f}" for k, v in rss.items()))


if __name__ == "__main__":
    main()
