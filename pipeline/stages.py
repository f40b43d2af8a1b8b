"""The stages a chunk of a streaming run goes through after generation, one contract each.

Every stage is a plain class with its settings in `__init__` and `run(docs) -> StageOutput`
over one chunk's documents (the filter contract of filters/base.py: kept documents in input
order, rejected ones with their reasons), like datatrove's pipeline steps. State that must cross
chunks lives in the stage object itself and is named in its docstring; nothing here knows
about Prefect.

    ExactStage    exact dedup, streaming: a running map of exact keys to the first id
    QualityStage  the quality chain (rules, language id, decontamination, classifier), built
                  once per worker process and run on a process pool, or on the Dask cluster's
                  workers when the run has one, when a chunk is large
    NearStage     MinHash against the persistent index (final at once), then the run's own
                  near-duplicates spilled as candidates (final after the last chunk)
"""

from __future__ import annotations

import multiprocessing
import os
import threading
import uuid
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from booksmith.filters import ChainResult, StageOutput, build_chain, run_chain
from booksmith.filters.base import Filter
from booksmith.filters.dedup import MINHASH, DedupIndex, DedupSettings
from booksmith.filters.dedup.candidates import CandidateStore
from booksmith.filters.dedup.engine import EXACT, duplicate_evidence
from booksmith.filters.dedup.minhash import signatures
from booksmith.filters.dedup.normalize import exact_key, words
from booksmith.pipeline.first_ids import FirstIds
from booksmith.schemas import Document
from booksmith.schemas.filter_settings import FilterSettings

if TYPE_CHECKING:
    from distributed import Client

POOL_MIN_DOCS = 256  # a chunk smaller than this is filtered in the calling process


# A new text that duplicates a taken-down document (its index entry is flagged): rejected
# under this reason and written without its text, so a takedown stays complete.
TAKEN_DOWN = "dedup_taken_down"


def taken_down(index: DedupIndex | None) -> frozenset[str]:
    """The ids a takedown flagged in the index (read once per run: a takedown and a run do not
    overlap)."""
    return frozenset(index.taken_down()) if index is not None else frozenset()


def reject_indexed(
    out: StageOutput, doc: Document, reason: str, match: Any, jaccard: float,
    blocked: frozenset[str],
) -> None:  # fmt: skip
    """Reject `doc` as a duplicate of an indexed document, with the evidence; a duplicate of a
    taken-down one loses its text."""
    evidence = duplicate_evidence(match.run_id, jaccard)
    if match.id in blocked:
        doc = doc.model_copy(update={"text": ""})
        reason, evidence = (
            TAKEN_DOWN,
            {**evidence, "text_removed": "a duplicate of a taken-down document"},
        )
    out.reject(doc, reason, match.id, evidence)


class ExactStage:
    """Exact duplicates of normalised text, of the persistent index or of an earlier document
    of this run. Cross-chunk state: `seen`, exact key -> the id of its first document
    (pipeline/first_ids.FirstIds: sorted keys in memory, the ids in the run's exact file).

    The first document of a group stays: in a nightly run the quality score is not set yet at
    this point (the classifier runs later), so the engine's rule (highest score, then earliest)
    is the earliest, and the earliest in the stream is the same whatever the chunking."""

    name = "dedup_exact"

    def __init__(
        self, seen: FirstIds, index: DedupIndex | None = None, enabled: bool = True
    ) -> None:
        self.seen, self.index, self.enabled = seen, index, enabled
        self.blocked = taken_down(index)
        self.words: dict[str, list[bytes]] = {}  # this chunk's words, for NearStage
        self.keys: dict[str, int] = {}  # this chunk's exact keys, for the index commit

    def run(self, docs: Sequence[Document]) -> StageOutput:
        out = StageOutput()
        ws = [words(d.text) for d in docs]
        keys = [exact_key(w) if w else 0 for w in ws]
        self.words = {d.id: w for d, w in zip(docs, ws, strict=True)}
        self.keys = {d.id: k for d, k in zip(docs, keys, strict=True)}
        indexed: list[Any] = [None] * len(docs)
        if self.enabled and self.index is not None and any(ws):
            rows = [i for i, w in enumerate(ws) if w]
            matches = self.index.lookup_exact(np.array([keys[i] for i in rows], dtype=np.uint64))
            for i, match in zip(rows, matches, strict=True):
                indexed[i] = match
        earlier = self.seen.ids(np.array(keys, dtype=np.uint64)) if self.enabled else []
        first: dict[int, str] = {}  # this chunk's new keys
        for i, doc in enumerate(docs):
            if not self.enabled or not ws[i]:  # no words: the empty filter's business
                out.kept.append(doc)
            elif indexed[i] is not None:
                reject_indexed(out, doc, EXACT, indexed[i], 1.0, self.blocked)
            elif (first_id := earlier[i] or first.get(keys[i])) is not None:
                out.reject(doc, EXACT, first_id, duplicate_evidence(doc.run_id, 1.0))
            else:
                first[keys[i]] = doc.id
                out.kept.append(doc)
        self.seen.add(list(first.items()))
        return out


# -- the quality chain on worker processes -------------------------------------------------------

_worker_chain: list[Filter] | None = None


def _build(settings_json: str, state: str) -> list[Filter]:
    settings = FilterSettings.model_validate_json(settings_json)
    return build_chain(settings, state=Path(state) if state else None)


def _init_worker(settings_json: str, state: str) -> None:
    """Each worker builds the chain once (models and the decontamination index loaded once)."""
    global _worker_chain
    _worker_chain = _build(settings_json, state)


def _run_worker(docs: list[Document]) -> ChainResult:
    assert _worker_chain is not None, "worker started without its chain"
    return run_chain(docs, _worker_chain)


def _cut(docs: Sequence[Document], parts: int) -> list[list[Document]]:
    """Contiguous slices, at most `parts`: concatenated in order they are the chunk again."""
    step = -(-len(docs) // parts)
    return [list(docs[i : i + step]) for i in range(0, len(docs), step)]


# -- the quality chain on Dask workers -----------------------------------------------------------


@dataclass(frozen=True)
class ChainSpec:
    """What a Dask worker needs to build the chain. `token` is one QualityStage's (one run's):
    a long-lived cluster serving several runs builds it again for each, since a model retrained
    between runs keeps its path."""

    token: str
    settings_json: str
    state: str


@dataclass(frozen=True)
class SliceRun:
    """Where a slice ran: the Dask worker, its process, and whether the chain was built then."""

    worker: str
    pid: int
    built: bool


_dask_chains: dict[str, list[Filter]] = {}  # in a Dask worker process: token -> chain
_dask_lock = threading.Lock()  # a worker's threads share the cache: one build per token
DASK_CHAINS_KEPT = 2  # a worker keeps the newest chains only (a run killed never evicts its own)


def _dask_chain(spec: ChainSpec) -> tuple[list[Filter], bool]:
    with _dask_lock:
        chain = _dask_chains.get(spec.token)
        if chain is not None:
            return chain, False
        while len(_dask_chains) >= DASK_CHAINS_KEPT:
            _dask_chains.pop(next(iter(_dask_chains)))
        chain = _dask_chains[spec.token] = _build(spec.settings_json, spec.state)
        return chain, True


def _run_dask_slice(docs: list[Document], spec: ChainSpec) -> tuple[ChainResult, SliceRun]:
    from distributed import get_worker

    chain, built = _dask_chain(spec)
    return run_chain(docs, chain), SliceRun(get_worker().address, os.getpid(), built)


def _forget_dask_chain(token: str) -> None:
    _dask_chains.pop(token, None)


def dask_chain_tokens() -> list[str]:
    """The stages whose chains this Dask worker holds: `client.run(dask_chain_tokens)`."""
    return list(_dask_chains)


class QualityStage:
    """The quality chain (filters/chain.py) over a chunk. Built once per process: lazily in the
    calling process for small chunks; for large ones, which are cut into one contiguous slice
    per worker (every rule judges one document alone, so the verdicts do not depend on the
    cut), once per worker of a local process pool, or, when `client` is set (the run's Dask
    cluster), once per Dask worker process for this stage, the slices spread one per worker.
    Dask workers need the package, the model and `state` on their filesystem, as they do for
    generation. Cross-chunk state: `counts`; with Dask also where the slices ran,
    `dask_slices` ((worker, pid) -> slices) and `dask_builds` (worker -> chains built)."""

    name = "quality"

    def __init__(
        self,
        settings: FilterSettings,
        state: Path | None = None,
        workers: int | None = None,
        pool_min_docs: int | None = None,
        client: Client | None = None,
    ) -> None:
        self.settings, self.state = settings, state
        self.workers = workers or min(4, os.cpu_count() or 1)
        self.pool_min_docs = pool_min_docs
        self.client = client
        self.spec = ChainSpec(uuid.uuid4().hex, settings.model_dump_json(), str(state or ""))
        self._chain: list[Filter] | None = None
        self._pool: ProcessPoolExecutor | None = None
        self.counts: dict[str, dict[str, int]] = {}
        self.dask_slices: Counter[tuple[str, int]] = Counter()
        self.dask_builds: Counter[str] = Counter()

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
                initargs=(self.spec.settings_json, self.spec.state),
            )
        return self._pool

    def run(self, docs: Sequence[Document]) -> StageOutput:
        out = StageOutput()
        for r in self._results(docs):
            out.kept += r.kept
            out.rejected += r.rejected
            for name, c in r.counts.items():
                mine = self.counts.setdefault(name, {})
                for key, n in c.items():
                    mine[key] = mine.get(key, 0) + n
        return out

    def _results(self, docs: Sequence[Document]) -> list[ChainResult]:
        """The chain's results over the chunk's slices, in slice order."""
        least = POOL_MIN_DOCS if self.pool_min_docs is None else self.pool_min_docs
        dask = self._dask_workers()
        width = len(dask) or self.workers
        if len(docs) < max(least, width) or not (dask or width > 1):
            return [run_chain(docs, self.chain())]
        if dask:
            return self._on_dask(_cut(docs, width), dask)
        return list(self.pool().map(_run_worker, _cut(docs, width)))

    def _dask_workers(self) -> list[str]:
        """The cluster's workers now (an adaptive cluster may have none: then the local pool)."""
        return sorted(self.client.nthreads()) if self.client is not None else []

    def _on_dask(self, slices: list[list[Document]], workers: list[str]) -> list[ChainResult]:
        assert self.client is not None
        # One slice per worker (each keeps its chain warm); loose, so a worker that left
        # does not hold its slice back. pure=False: no hashing of the documents for a key.
        futures = [
            self.client.submit(
                _run_dask_slice, part, self.spec, workers=[worker], allow_other_workers=True,
                pure=False,
            )
            for part, worker in zip(slices, workers, strict=False)
        ]  # fmt: skip
        results: list[ChainResult] = []
        for result, where in self.client.gather(futures):
            self.dask_slices[(where.worker, where.pid)] += 1
            self.dask_builds[where.worker] += where.built
            results.append(result)
        return results

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None
        if self.client is not None and self.dask_builds and self.client.status == "running":
            # the workers outlive the run on a shared cluster: free this run's chains there
            self.client.run(_forget_dask_chain, self.spec.token, on_error="ignore")


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
        self.blocked = taken_down(index)
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
                reject_indexed(out, docs[i], MINHASH, m, m.jaccard, self.blocked)
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
