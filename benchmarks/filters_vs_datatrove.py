"""The quality filter chain: booksmith against datatrove's equivalent filters, same documents.

Both sides run in this process over the same synthetic corpus (textbook-like documents built
from the labelled fixture's educational sentences and English-like filler, plus looping,
junk, French and benchmark-planted documents), one after the other, best of `--repeats`.

- booksmith: `filters.chain.build_chain` = empty, generation artifacts, Gopher quality,
  Gopher repetition, C4/FineWeb lines, language id (bundled lid.176.ftz), decontamination
  against the fixture benchmarks plus `--bench-items` synthetic items (COUNTED on booksmith's
  side), and the fastText quality classifier trained on tests/fixtures/quality_labelled.jsonl.
  Word tokenizer: whitespace split (n-gram hashes in NumPy).
- datatrove: GopherQualityFilter -> GopherRepetitionFilter -> LanguageFilter(en, 0.65) ->
  FastTextClassifierFilter(keep edu >= 0.5), chained generators, default settings. Its
  English word tokenizer is spaCy's blank `en` (no download). LanguageFilter is given the same
  bundled lid.176.ftz (its default downloads lid.176.bin) and the classifier the same model
  file. datatrove checks for the `fasttext-numpy2-wheel` distribution; here the `fasttext`
  module comes from `fasttext-numpy2` (same code, newer build), so that check is relaxed.
  No decontamination step exists in datatrove.

Install the baseline for the benchmark only: `pip install "datatrove==0.10.*" spacy fasteners`
(not datatrove[processing]: it would replace fasttext-numpy2 with fasttext-numpy2-wheel).

    python -m benchmarks.filters_vs_datatrove [--docs 50000] [--repeats 1] [--bench-items 5000]

Ends with `RESULT filters_vs_datatrove:datatrove ratio=<booksmith/datatrove> ...` (docs/s;
ratio > 1 means booksmith is faster).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import random
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from booksmith.filters.base import run_chain
from booksmith.filters.benchmarks import BenchmarkItem, load_benchmark
from booksmith.filters.chain import build_chain
from booksmith.filters.decontam import BenchmarkIndex
from booksmith.filters.fasttext_model import bundled_lid176
from booksmith.filters.inputs import user_document
from booksmith.filters.quality import train
from booksmith.filters.records_io import read_labelled
from booksmith.schemas import Document
from booksmith.schemas.filter_settings import FilterSettings
from booksmith.schemas.records import sha256_hex
from tests.fakeserver import completion_text

FIXTURES = Path(__file__).resolve().parents[1] / "tests" / "fixtures"
FRENCH = [
    "La cellule est l'unité de base de tous les êtres vivants.",
    "Les plantes fabriquent leur nourriture grâce à la lumière du soleil.",
    "L'eau s'évapore, se condense en nuages puis retombe sous forme de pluie.",
    "Un nombre premier n'a que deux diviseurs : un et lui-même.",
    "La Révolution industrielle a transformé la façon dont les gens travaillaient.",
    "Le cœur pompe le sang dans tout le corps à travers les artères.",
]


def make_corpus(n: int, seed: int = 0) -> tuple[list[tuple[str, str]], dict[str, int]]:
    """(id, text) pairs and the count of each kind."""
    rng = random.Random(seed)
    rows = [json.loads(line) for line in (FIXTURES / "quality_labelled.jsonl").open()]
    good = [r["text"] for r in rows if r["score"] >= 3]
    junk = [r["text"] for r in rows if r["score"] < 3]
    mmlu = FIXTURES / "benchmarks" / "mmlu_mini.jsonl"
    questions = [json.loads(line)["question"] for line in mmlu.open()]
    docs, kinds = [], Counter[str]()
    for i in range(n):
        u = rng.random()
        filler = completion_text(sha256_hex(f"{seed}:{i}")[:16], rng.randint(120, 220))
        body = rng.sample(good, rng.randint(8, 14))
        if u < 0.70:
            kind, parts = "textbook", [*body[:5], filler, *body[5:]]
        elif u < 0.80:
            kind, parts = "looping", [body[0], *([body[1], body[2]] * rng.randint(5, 10))]
        elif u < 0.90:
            kind, parts = "junk", rng.sample(junk, 10)
        elif u < 0.95:
            kind, parts = "french", [rng.choice(FRENCH) for _ in range(25)]
        else:
            kind, parts = "planted", [*body[:4], rng.choice(questions), filler, *body[4:]]
        kinds[kind] += 1
        paragraphs = ["# Chapter", *(" ".join(parts[j : j + 3]) for j in range(0, len(parts), 3))]
        docs.append((f"doc-{i}", "\n\n".join(paragraphs)))
    return docs, dict(kinds)


def to_documents(corpus: list[tuple[str, str]], n_tokens: list[int]) -> list[Document]:
    """The corpus as `booksmith filter` reads a user's file (filters/inputs.py)."""
    return [
        user_document({"id": i, "text": t, "n_tokens": n, "finish_reason": "stop"})
        for (i, t), n in zip(corpus, n_tokens, strict=True)
    ]


def synthetic_items(n: int) -> list[BenchmarkItem]:
    return [
        BenchmarkItem("synthetic", i, "question", completion_text(sha256_hex(f"q{i}")[:16], 30))
        for i in range(n)
    ]


@contextlib.contextmanager
def quiet_stderr() -> Iterator[None]:
    """datatrove logs through loguru to fd 2."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)


def run_booksmith(docs: list[Document], chain: list[Any]) -> tuple[float, dict[str, int]]:
    gc.collect()
    start = time.perf_counter()
    result = run_chain(docs, chain)
    elapsed = time.perf_counter() - start
    return elapsed, dict(Counter(r.reason.split(":")[0] for r in result.rejected))


def datatrove_filters(model: Path) -> list[Any]:
    import datatrove.pipeline.base as dt_base
    from datatrove.pipeline.filters import (
        FastTextClassifierFilter,
        GopherQualityFilter,
        GopherRepetitionFilter,
        LanguageFilter,
    )
    from fasttext.FastText import _FastText

    check = dt_base.check_required_dependencies

    def relaxed(step: str, deps: list[Any]) -> None:
        wheel, ours = ("fasttext", "fasttext-numpy2-wheel"), ("fasttext", "fasttext-numpy2")
        fixed = [ours if d == wheel else d for d in deps]
        check(step, fixed)

    dt_base.check_required_dependencies = relaxed
    lang = LanguageFilter(languages=["en"], language_threshold=0.65)
    lang.model._model = _FastText(str(bundled_lid176()))  # the bundled file, not a download
    quality = FastTextClassifierFilter(
        model_url=str(model), keep_labels=("edu", 0.5), newline_replacement=" "
    )
    quality._model = _FastText(str(model))
    return [GopherQualityFilter(), GopherRepetitionFilter(), lang, quality]


def run_datatrove(corpus: list[tuple[str, str]], filters: list[Any]) -> tuple[float, int]:
    from datatrove.data import Document as DTDocument

    docs = [DTDocument(text=t, id=i, metadata={}) for i, t in corpus]
    gc.collect()
    start = time.perf_counter()
    with quiet_stderr():
        stream: Any = iter(docs)
        for f in filters:
            stream = f.run(stream, rank=0, world_size=1)
        kept = sum(1 for _ in stream)
    return time.perf_counter() - start, kept


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=50_000)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--bench-items", type=int, default=5_000)
    args = parser.parse_args()

    from booksmith.shards.encodings import count_tokens

    corpus, kinds = make_corpus(args.docs)
    docs = to_documents(corpus, count_tokens([t for _, t in corpus]))
    chars = sum(len(t) for _, t in corpus)
    with tempfile.TemporaryDirectory() as tmp:
        data, _ = read_labelled(FIXTURES / "quality_labelled.jsonl")
        model = train(data, Path(tmp) / "quality").model_path
        items = [
            *load_benchmark(str(FIXTURES / "benchmarks" / "mmlu_mini.jsonl")),
            *load_benchmark(str(FIXTURES / "benchmarks" / "gsm8k_mini.csv")),
            *synthetic_items(args.bench_items),
        ]
        index = BenchmarkIndex(items)
        settings = FilterSettings()
        settings.quality.model_path = model
        chain = build_chain(settings, index=index)
        dt_filters = datatrove_filters(model)

        print(f"machine: {platform.node()} {platform.machine()} {os.cpu_count()} cores, "
              f"Python {platform.python_version()}")  # fmt: skip
        print(f"corpus: {len(corpus)} documents, {chars / len(corpus):.0f} chars each, {kinds}")
        print(f"benchmark index: {len(index)} items; quality model {model.stat().st_size:,} B")
        # Warm-up: spaCy's tokenizer, fastText pages, NumPy; not timed.
        run_booksmith(docs[:100], chain)
        run_datatrove(corpus[:100], dt_filters)
        best_b = best_d = float("inf")
        reasons: dict[str, int] = {}
        kept_d = 0
        for r in range(args.repeats):
            tb, reasons = run_booksmith(docs, chain)
            td, kept_d = run_datatrove(corpus, dt_filters)
            best_b, best_d = min(best_b, tb), min(best_d, td)
            print(f"run {r + 1}: booksmith {tb:.1f} s, datatrove {td:.1f} s")
        b_rate, d_rate = len(docs) / best_b, len(docs) / best_d
        print(f"booksmith: {b_rate:,.0f} docs/s (decontamination included); dropped {reasons}")
        print(f"datatrove: {d_rate:,.0f} docs/s (no decontamination step); kept {kept_d}")
        print(
            f"RESULT filters_vs_datatrove:datatrove ratio={b_rate / d_rate:.2f} "
            f"booksmith={b_rate:.0f} baseline={d_rate:.0f} unit=docs/s"
        )


if __name__ == "__main__":
    main()
