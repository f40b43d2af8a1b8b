"""Token shards against bare tiktoken: encode + write Parquet vs `encode_ordinary_batch` alone.

booksmith: `shards.tokens.write_token_shards` (threaded encoding straight into NumPy, end-of-text
after every document, Arrow conversion, ZSTD Parquet written on its own thread, fsync, rename,
sha256 of every shard). Baseline: `Encoding.encode_ordinary_batch(texts, num_threads=T)` on the
same texts and thread count, keeping the token lists in memory and writing nothing.
Both run in this process, alternating, best of `--repeat`; figures in MB of UTF-8 text per
second. The text: the Python standard library's sources, cut into 4 KB documents.

    python -m benchmarks.tokenize_vs_tiktoken [--mb 16] [--threads 2] [--encoding cl100k_base]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sysconfig
import tempfile
import time
from pathlib import Path

from booksmith.shards.encodings import get_encoding
from booksmith.shards.tokens import write_token_shards


def make_texts(total_bytes: int, doc_bytes: int = 4_000) -> list[str]:
    """Real text that is on every machine: the Python standard library's sources (prose in
    docstrings and comments, and code, as in Phi-1's code textbooks), cut into documents of
    about `doc_bytes`, repeated if needed to reach `total_bytes`."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(
        p for p in root.rglob("*.py") if not {"test", "tests", "site-packages"} & set(p.parts)
    )
    texts: list[str] = []
    size = 0
    while size < total_bytes:
        for path in files:
            source = path.read_text(encoding="utf-8", errors="replace")
            for start in range(0, len(source), doc_bytes):
                texts.append(source[start : start + doc_bytes])
                size += len(texts[-1].encode())
                if size >= total_bytes:
                    return texts
    return texts


def run(mb: float, threads: int, encoding: str, repeat: int) -> None:
    enc = get_encoding(encoding)
    texts = make_texts(int(mb * 1e6))
    n_bytes = sum(len(t.encode()) for t in texts)
    items = [(f"doc{i:07d}", t) for i, t in enumerate(texts)]
    enc.encode_ordinary_batch(texts[:50], num_threads=threads)  # warm-up
    best_bare = best_ours = float("inf")
    tokens = 0
    workdir = Path(tempfile.mkdtemp(prefix="bench-tokens-"))
    try:
        for i in range(repeat):
            t0 = time.perf_counter()
            out = enc.encode_ordinary_batch(texts, num_threads=threads)
            best_bare = min(best_bare, time.perf_counter() - t0)
            tokens = sum(len(x) for x in out)
            del out
            root = workdir / f"run{i}"
            t0 = time.perf_counter()
            result = write_token_shards(items, enc, root=root, num_threads=threads)
            best_ours = min(best_ours, time.perf_counter() - t0)
            assert result.text_tokens == tokens
            shard_bytes = sum(s.bytes for s in result.shards)
            shutil.rmtree(root)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    bare_rate, our_rate = n_bytes / best_bare / 1e6, n_bytes / best_ours / 1e6
    print(
        f"{len(texts)} documents, {n_bytes / 1e6:.1f} MB of text, {tokens:,} {encoding} tokens, "
        f"{threads} threads, {os.cpu_count()} CPUs, best of {repeat}"
    )
    print(f"bare encode_ordinary_batch: {best_bare:.2f} s, {tokens / best_bare / 1e6:.2f} M tok/s")
    print(
        f"booksmith token shards:     {best_ours:.2f} s, {tokens / best_ours / 1e6:.2f} M tok/s, "
        f"{shard_bytes / 1e6:.1f} MB of Parquet"
    )
    print(
        f"RESULT tokenize_vs_tiktoken:tiktoken ratio={our_rate / bare_rate:.3f} "
        f"booksmith={our_rate:.2f} baseline={bare_rate:.2f} unit=MB/s"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=16.0, help="MB of text")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--encoding", default="cl100k_base")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    run(args.mb, args.threads, args.encoding, args.repeat)


if __name__ == "__main__":
    main()
