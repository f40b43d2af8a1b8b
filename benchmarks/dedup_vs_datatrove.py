"""MinHash near-dedup: booksmith against datatrove's MinHash pipeline and plain datasketch.

All three run in this process on the same synthetic corpus (tests/dedup_corpus.py: distinct
~600-word documents plus edited copies whose exact 5-gram Jaccard with their original is
known), with the same parameters: word 5-grams, 112 permutations in 14 bands x 8 rows.

- booksmith: `find_duplicates` with exact dedup off (normalise, numpy signatures, LSH, the
  estimated-Jaccard check, union-find clusters). Tokenizer: booksmith's normaliser (NFKC,
  lowercase, punctuation folded, split on non-word characters).
- datasketch: the straightforward pipeline: Python shingling of the same normalised words,
  `MinHash.bulk`, `MinHashLSH` query-then-insert, each candidate checked with `jaccard()` at the
  same threshold (so both sides remove the same kind of set).
- datatrove: MinhashDedupSignature, Buckets (14 tasks), Cluster, Filter on
  LocalPipelineExecutor (one worker) over a JSONL copy of the corpus; its default English word
  tokenizer (spaCy's blank `en`) and text simplification. Install it for the benchmark only:
  `pip install "datatrove==0.10.*" spacy orjson`.

Each side's removed set is scored against the truth: recall over designed pairs with J >= 0.85
(at least one of the two removed) and the share of removed documents with no family member at
J >= 0.6 (false positives). It also prints booksmith's flag rate by true-Jaccard bin, with and
without the check, and the size and load time of a file index of `--index-entries` synthetic
signatures.

    python -m benchmarks.dedup_vs_datatrove [--docs 20000] [--words 600] [--dup-share 0.25]
        [--skip-datatrove] [--index-entries 1000000]

Ends with `RESULT dedup_vs_datatrove:datatrove ...` and `...:datasketch ...` (docs/s; ratio
> 1 means booksmith is faster).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import itertools
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from booksmith.filters.dedup import DedupSettings, FileIndex, find_duplicates, signatures
from booksmith.filters.dedup.lsh import band_keys, candidate_pairs, verified_pairs
from booksmith.filters.dedup.minhash import MinHashParams
from booksmith.filters.dedup.normalize import words
from tests.dedup_corpus import Corpus, exact_jaccard, make_corpus

PARAMS = MinHashParams()
THRESHOLD = PARAMS.band_threshold


@contextlib.contextmanager
def stderr_to(path: Path) -> Iterator[None]:
    """Send fd 2 to a file: datatrove logs every task through loguru and tqdm."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(path, "w") as f:
        os.dup2(f.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)


@contextlib.contextmanager
def timer(label: str, into: dict[str, float]) -> Iterator[None]:
    start = time.perf_counter()
    yield
    into[label] = time.perf_counter() - start


# -- the three sides; each returns the set of removed document indexes


def run_booksmith(corpus: Corpus) -> tuple[set[int], dict[str, float]]:
    times: dict[str, float] = {}
    with timer("total", times):
        verdicts = find_duplicates(
            corpus.ids, corpus.texts, settings=DedupSettings(exact=False, index="none")
        )
    # The same work in stages, for the breakdown only.
    with timer("normalise", times):
        ws = [words(t) for t in corpus.texts]
    with timer("signatures", times):
        sigs, _ = signatures(ws, PARAMS)
    with timer("lsh+check", times):
        verified_pairs(sigs, candidate_pairs(band_keys(sigs, PARAMS.bands, PARAMS.rows)), THRESHOLD)
    return {i for i, v in enumerate(verdicts) if v is not None}, times


def run_datasketch(corpus: Corpus) -> tuple[set[int], dict[str, float]]:
    from datasketch import MinHash, MinHashLSH

    times: dict[str, float] = {}
    start = time.perf_counter()
    with timer("shingling", times):
        shingle_sets = []
        for text in corpus.texts:
            ws = words(text)
            grams = [b" ".join(ws[i : i + 5]) for i in range(len(ws) - 4)] or [b" ".join(ws)]
            shingle_sets.append(grams)
    with timer("hashing", times):
        minhashes = MinHash.bulk(shingle_sets, num_perm=PARAMS.num_perm, seed=PARAMS.seed)
    removed: set[int] = set()
    with timer("lsh", times):
        lsh = MinHashLSH(num_perm=PARAMS.num_perm, params=(PARAMS.bands, PARAMS.rows))
        for i, m in enumerate(minhashes):
            if any(minhashes[k].jaccard(m) >= THRESHOLD for k in lsh.query(m)):
                removed.add(i)
            else:
                lsh.insert(i, m)
    times["total"] = time.perf_counter() - start
    return removed, times


def run_datatrove(corpus: Corpus, workdir: Path) -> tuple[set[int], dict[str, float]]:
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup import (
        MinhashConfig,
        MinhashDedupBuckets,
        MinhashDedupCluster,
        MinhashDedupFilter,
        MinhashDedupSignature,
    )
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter
    from datatrove.utils.hashing import HashConfig

    data = workdir / "data"
    data.mkdir(parents=True)
    with open(data / "corpus.jsonl", "w") as f:
        for i, text in zip(corpus.ids, corpus.texts, strict=True):
            f.write(json.dumps({"id": i, "text": text}) + "\n")
    config = MinhashConfig(
        n_grams=5,
        num_buckets=14,
        hashes_per_bucket=8,
        seed=1,
        hash_config=HashConfig(precision=64, hash_fc="sha1"),
    )
    sigs, buckets, clusters = workdir / "sigs", workdir / "buckets", workdir / "remove_ids"
    logs = workdir / "logs"

    def execute(pipeline: list, tasks: int, name: str) -> None:
        LocalPipelineExecutor(
            pipeline=pipeline,
            tasks=tasks,
            workers=1,
            logging_dir=str(logs / name),
            skip_completed=False,
        ).run()

    times: dict[str, float] = {}
    start = time.perf_counter()
    with timer("signatures", times):
        execute([JsonlReader(str(data)), MinhashDedupSignature(str(sigs), config=config)], 1, "s1")
    with timer("buckets", times):
        execute([MinhashDedupBuckets(str(sigs), str(buckets), config=config)], 14, "s2")
    with timer("cluster", times):
        execute([MinhashDedupCluster(str(buckets), str(clusters), config=config)], 1, "s3")
    with timer("filter", times):
        execute(
            [
                JsonlReader(str(data)),
                MinhashDedupFilter(
                    str(clusters), exclusion_writer=JsonlWriter(str(workdir / "removed"))
                ),
                JsonlWriter(str(workdir / "kept")),
            ],
            1,
            "s4",
        )
    times["total"] = time.perf_counter() - start
    index_of = {d: i for i, d in enumerate(corpus.ids)}
    removed: set[int] = set()
    import gzip

    for path in (workdir / "removed").glob("*"):
        with gzip.open(path, "rt") if path.suffix == ".gz" else open(path) as f:
            removed.update(index_of[json.loads(line)["id"]] for line in f)
    return removed, times


# -- scoring against the truth


def families(corpus: Corpus) -> dict[int, list[int]]:
    """Each document's designed family: its original and every edited copy of it."""
    fam: dict[int, list[int]] = {}
    for base, variant, _ in corpus.pairs:
        fam.setdefault(base, [base]).append(variant)
    out: dict[int, list[int]] = {}
    for members in fam.values():
        for m in members:
            out[m] = members
    return out


def score(corpus: Corpus, removed: set[int], fam: dict[int, list[int]]) -> tuple[float, float]:
    """(recall on pairs with J >= 0.85, false-positive share of the removed documents)."""
    high = [(b, v) for b, v, j in corpus.pairs if j >= 0.85]
    recall = sum(b in removed or v in removed for b, v in high) / max(len(high), 1)
    unjustified = 0
    for r in removed:
        others = [m for m in fam.get(r, []) if m != r]
        if not others or max(exact_jaccard(corpus.texts[r], corpus.texts[m]) for m in others) < 0.6:
            unjustified += 1
    return recall, unjustified / max(len(removed), 1)


def rate_table(corpus: Corpus) -> str:
    """booksmith's pair flag rate by true Jaccard, with the check and with banding alone."""
    sigs, _ = signatures([words(t) for t in corpus.texts], PARAMS)
    cands = candidate_pairs(band_keys(sigs, PARAMS.bands, PARAMS.rows))
    flagged = {tuple(p) for p in verified_pairs(sigs, cands, THRESHOLD).tolist()}
    banded = {tuple(p) for p in cands.tolist()}
    edges = [0.0, 0.3, 0.4, 0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 1.0001]
    lines = [
        "| true J | pairs | flagged (LSH + check) | flagged (banding alone) |",
        "|---|---|---|---|",
    ]
    for lo, hi in itertools.pairwise(edges):
        pairs = [(min(b, v), max(b, v)) for b, v, j in corpus.pairs if lo <= j < hi]
        if not pairs:
            continue
        f = sum(p in flagged for p in pairs) / len(pairs)
        g = sum(p in banded for p in pairs) / len(pairs)
        lines.append(f"| {lo:.2f}-{min(hi, 1.0):.2f} | {len(pairs)} | {f:.3f} | {g:.3f} |")
    return "\n".join(lines)


def index_figures(n: int) -> str:
    rng = np.random.default_rng(0)
    sigs = rng.integers(0, 2**32, size=(n, PARAMS.num_perm), dtype=np.uint32)
    exact = rng.integers(0, 2**63, size=n).astype(np.uint64)
    ids = [f"{i:032x}" for i in range(n)]  # generated ids are 32 hex characters
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "minhash"
        start = time.perf_counter()
        FileIndex(path).add("run", ids, sigs, exact)
        write_s = time.perf_counter() - start
        size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
        del sigs
        gc.collect()
        start = time.perf_counter()
        index = FileIndex(path)
        index.lookup_exact(np.zeros(1, dtype=np.uint64))  # forces the load and band sort
        load_s = time.perf_counter() - start
        probe = rng.integers(0, 2**32, size=(1000, PARAMS.num_perm), dtype=np.uint32)
        start = time.perf_counter()
        index.lookup_near(probe, THRESHOLD)
        query_s = time.perf_counter() - start
    return (
        f"file index, {n:,} entries: {size / n:.0f} bytes/doc on disk, write {write_s:.1f} s, "
        f"load (read + band sort) {load_s:.2f} s, 1,000 lookups {query_s * 1000:.0f} ms"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--docs", type=int, default=20_000)
    parser.add_argument("--words", type=int, default=600)
    parser.add_argument("--dup-share", type=float, default=0.25, help="share of edited copies")
    parser.add_argument("--skip-datatrove", action="store_true")
    parser.add_argument("--index-entries", type=int, default=1_000_000, help="0 to skip")
    args = parser.parse_args()

    n_variants = int(args.docs * args.dup_share)
    corpus = make_corpus(args.docs - n_variants, n_variants, words_per_doc=args.words, seed=7)
    fam = families(corpus)
    n = len(corpus.texts)
    print(
        f"corpus: {n} documents, ~{args.words} words, {n_variants} edited copies; "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"Python {sys.version.split()[0]}, load {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    results: dict[str, tuple[float, set[int], dict[str, float]]] = {}
    # booksmith and datasketch twice each, alternating; the faster run of each counts.
    for _ in range(2):
        for name, fn in (("booksmith", run_booksmith), ("datasketch", run_datasketch)):
            gc.collect()
            removed, times = fn(corpus)
            if name not in results or times["total"] < results[name][0]:
                results[name] = (times["total"], removed, times)
    if not args.skip_datatrove:
        workdir = Path(tempfile.mkdtemp(prefix="dedup-bench-"))
        try:
            with stderr_to(Path(tempfile.gettempdir()) / "dedup_bench_datatrove.log"):
                removed, times = run_datatrove(corpus, workdir)
            results["datatrove"] = (times["total"], removed, times)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)

    print(
        "\n| side | tokenizer | seconds | docs/s | removed | recall J>=0.85 | FP share | stages |"
    )
    print("|---|---|---|---|---|---|---|---|")
    tokenizers = {
        "booksmith": "booksmith normaliser",
        "datasketch": "booksmith normaliser",
        "datatrove": "spaCy blank en + simplify_text",
    }
    for name, (total, removed, times) in results.items():
        recall, fp = score(corpus, removed, fam)
        stages = ", ".join(f"{k} {v:.2f}" for k, v in times.items() if k != "total")
        print(
            f"| {name} | {tokenizers[name]} | {total:.2f} | {n / total:,.0f} | {len(removed)} | "
            f"{recall:.3f} | {fp:.3f} | {stages} |"
        )
    print("\nbooksmith pair flag rate by true Jaccard (designed pairs):")
    print(rate_table(corpus))
    if args.index_entries:
        print("\n" + index_figures(args.index_entries))
    ours = n / results["booksmith"][0]
    for name in ("datatrove", "datasketch"):
        if name in results:
            theirs = n / results[name][0]
            print(
                f"RESULT dedup_vs_datatrove:{name} ratio={ours / theirs:.2f} "
                f"booksmith={ours:.0f} baseline={theirs:.0f} unit=docs/s"
            )


if __name__ == "__main__":
    main()
