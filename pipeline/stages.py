"""The stages a chunk of a streaming run goes through after generation, one contract each.

Every stage is a plain class with its settings in `__init__` and `run(docs) -> StageOutput`
over one chunk's documents (the filter contract of filters/base.py: kept documents in input
order, rejected ones with their reasons), like datatrove's pipeline steps. State that must cross
chunks lives in the stage object itself and is named in its docstring; nothing here knows
about Prefect.

    ExactStage    exact dedup, streaming: a running map of exact keys to the first id
    QualityStage  the quality chain (rules, language id, decontamination, classifier), built
                  once per worker process and run on a process pool when a chunk is large
    NearStage     MinHash against the persistent index (final at once), then the run's own
                  near-duplicates spilled as candidates (final after the last chunk)
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from booksmith.filters import ChainResult, StageOutput, build_chain, run_chain
from booksmith.filters.base import Filter
from booksmith.filters.dedup import MINHASH, DedupIndex, DedupSettings
from booksmith.filters.dedup.candidates import CandidateStore
from booksmith.filters.dedup.engine import EXACT
from booksmith.filters.dedup.minhash import signatures
from booksmith.filters.dedup.normalize import exact_key, words
from booksmith.filters.settings import FilterSettings
from booksmith.schemas import Document

POOL_MIN_DOCS = 256  # a chunk smaller than this is filtered in the calling process


class ExactStage:
    """Exact duplicates of normalised text, of the persistent index or of an earlier document
    of this run. Cross-chunk state: `seen`, exact key -> the id of its first document.

    The first document of a group stays: in a nightly run the quality score is not set yet at
    this point (the classifier runs later), so the engine's rule (highest score, then earliest)
    is the earliest, and the earliest in the stream is the same whatever the chunking."""

    name = "dedup_exact"

    def __init__(self, index: DedupIndex | None = None, enabled: bool = True) -> None:
        self.index, self.enabled = index, enabled
        self.seen: dict[int, str] = {}
        self.words: dict[str, list[bytes]] = {}  # this chunk's words, for NearStage
        self.keys: dict[str, int] = {}  # this chunk's exact keys, for the index commit
        self.added: list[tuple[int, str]] = []  # what this chunk added to `seen`

    def run(self, docs: Sequence[Document]) -> StageOutput:
        out = StageOutput()
        ws = [words(d.text) for d in docs]
        keys = [exact_key(w) if w else 0 for w in ws]
        self.words = {d.id: w for d, w in zip(docs, ws, strict=True)}
        self.keys = {d.id: k for d, k in zip(docs, keys, strict=True)}
        self.added = []
        indexed: list[Any] = [None] * len(docs)
        if self.enabled and self.index is not None and any(ws):
            rows = [i for i, w in enumerate(ws) if w]
            matches = self.index.lookup_exact(np.array([keys[i] for i in rows], dtype=np.uint64))
            for i, match in zip(rows, matches, strict=True):
                indexed[i] = match
        for i, doc in enumerate(docs):
            if not self.enabled or not ws[i]:  # no words: the empty filter's business
                out.kept.append(doc)
            elif indexed[i] is not None:
                out.reject(doc, EXACT, duplicate_of=indexed[i].id)
            elif keys[i] in self.seen:
                out.reject(doc, EXACT, duplicate_of=self.seen[keys[i]])
            else:
                self.seen[keys[i]] = doc.id
                self.added.append((keys[i], doc.id))
                out.kept.append(doc)
        return out


# -- the quality chain on worker processes -------------------------------------------------------

_worker_chain: list[Filter] | None = None


def _init_worker(settings_json: str, state: str | None) -> None:
    """Each worker builds the chain once (models and the decontamination index loaded once)."""
    global _worker_chain
    settings = FilterSettings.model_validate_json(settings_json)
    _worker_chain = build_chain(settings, state=Path(state) if state else None)


def _run_worker(docs: list[Document]) -> ChainResult:
    assert _worker_chain is not None, "worker started without its chain"
    return run_chain(docs, _worker_chain)


class QualityStage:
    """The quality chain (filters/chain.py) over a chunk. Built once per process: lazily in the
    calling process for small chunks, once per worker for large ones, which are cut into one
    contiguous slice per worker (every rule judges one document alone, so the verdicts do not
    depend on the cut). No cross-chunk state."""

    name = "quality"

    def __init__(
        self,
        settings: FilterSettings,
        state: Path | None = None,
        workers: int | None = None,
        pool_min_docs: int | None = None,
    ) -> None:
        self.settings, self.state = settings, state
        self.workers = workers or min(4, os.cpu_count() or 1)
        self.pool_min_docs = pool_min_docs
        self._chain: list[Filter] | None = None
        self._pool: ProcessPoolExecutor | None = None
        self.counts: dict[str, dict[str, int]] = {}

    def chain(self) -> list[Filter]:
        if self._chain is None:
            self._chain = build_chain(self.settings, state=self.state)
        return self._chain

    def pool(self) -> ProcessPoolExecutor:
        if self._pool is None:
            # spawn, not fork: the flow process runs threads (Prefect, the HTTP client)
            self._pool = ProcessPoolExecutor(
                self.workers,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_init_worker,
                initargs=(self.settings.model_dump_json(), str(self.state or "")),
            )
        return self._pool

    def run(self, docs: Sequence[Document]) -> StageOutput:
        least = POOL_MIN_DOCS if self.pool_min_docs is None else self.pool_min_docs
        if self.workers > 1 and len(docs) >= max(least, self.workers):
            step = -(-len(docs) // self.workers)
            slices = [list(docs[i : i + step]) for i in range(0, len(docs), step)]
            results = list(self.pool().map(_run_worker, slices))
        else:
            results = [run_chain(docs, self.chain())]
        out = StageOutput()
        for r in results:
            out.kept += r.kept
            out.rejected += r.rejected
            for name, c in r.counts.items():
                mine = self.counts.setdefault(name, {})
                for key, n in c.items():
                    mine[key] = mine.get(key, 0) + n
        return out

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None


class NearStage:
    """MinHash near-duplicates. Against the persistent index the verdict is final at once;
    within the run the survivors are spilled to `store` as candidates and `CandidateStore.
    resolve()` decides after the last chunk (a cluster keeps its best document by quality score
    across every chunk). Signatures are computed here once, from ExactStage's words, and are the
    ones the index commit stores. Cross-chunk state: the store (on disk)."""

    name = "dedup_minhash"

    def __init__(
        self, settings: DedupSettings, store: CandidateStore, index: DedupIndex | None = None
    ) -> None:
        self.settings, self.store, self.index = settings, store, index
        self.topics: dict[str, int] = {}  # topic key -> index, for the fill account
        self.rows: dict[str, int] = {}  # this chunk's candidates: id -> store row

    def topic_index(self, doc: Document) -> int:
        key = " / ".join(doc.topic_path)
        return self.topics.setdefault(key, len(self.topics))

    def run(
        self,
        docs: Sequence[Document],
        ws: dict[str, list[bytes]],
        keys: dict[str, int],
        chunk: int,
    ) -> StageOutput:
        out = StageOutput()
        sigs, has_sig = signatures([ws[d.id] for d in docs], self.settings.params)
        matches: list[Any] = [None] * len(docs)
        rows = np.flatnonzero(has_sig)
        if self.settings.minhash and self.index is not None and rows.size:
            found = self.index.lookup_near(sigs[rows], self.settings.jaccard_threshold)
            for r, match in zip(rows.tolist(), found, strict=True):
                matches[r] = match
        left = [i for i, m in enumerate(matches) if m is None]
        for i, m in enumerate(matches):
            if m is not None:
                out.reject(docs[i], MINHASH, duplicate_of=m.id)
        first = self.store.count
        chosen = [docs[i] for i in left]
        self.store.append(
            [d.id for d in chosen],
            sigs[left] if left else np.zeros((0, self.settings.params.num_perm), np.uint32),
            scores=[d.quality_score for d in chosen],
            exact=np.array([keys[d.id] for d in chosen], dtype=np.uint64),
            topics=[self.topic_index(d) for d in chosen],
            tokens=[d.n_tokens for d in chosen],
            chunk=chunk,
            has_sig=has_sig[left] if left else np.zeros(0, bool),
        )
        self.rows = {d.id: first + k for k, d in enumerate(chosen)}
        out.kept = chosen
        return out
