"""Dedup over a stream of record batches, in bounded memory: `booksmith dedup` on a corpus of
any size, with the verdicts of the in-memory engine (`engine.find_duplicates`).

Pass 1 reads the batches once: per record its words, exact key and signature go to a
`CandidateStore` on disk, and the persistent index is asked about it (a batch at a time). Then
the verdicts are decided over the whole input in the engine's order: duplicates of the index's
exact keys, exact duplicates within the input (a group keeps its best-scored record, then the
earliest), near-duplicates of the index, near-duplicates within the input (clusters by the same
rule). Pass 2 reads the ids of the records other records are duplicates of; pass 3 reads the
batches again and hands each one to the caller with its verdicts.

Memory: about 16 bytes per record for the verdicts, 150 for the band keys at resolve time, and a
16-byte digest per id (ids must be unique); a batch of records at a time.
"""

from __future__ import annotations

import hashlib
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from booksmith.filters.dedup.candidates import CandidateStore
from booksmith.filters.dedup.cluster import resolve as resolve_clusters
from booksmith.filters.dedup.engine import EXACT, MINHASH
from booksmith.filters.dedup.index import DedupIndex
from booksmith.filters.dedup.minhash import signatures
from booksmith.filters.dedup.normalize import exact_key, words
from booksmith.schemas.dedup_settings import DedupSettings

KEEP, DROP_EXACT, DROP_NEAR = 0, 1, 2
Batches = Callable[[], Iterator[pa.Table]]  # a fresh pass over the input each call


class DuplicateIdError(ValueError):
    pass


@dataclass
class StreamVerdicts:
    """What pass 3 hands out with each batch: per row, None to keep or (reason, duplicate_of)."""

    status: np.ndarray  # int8: KEEP, DROP_EXACT, DROP_NEAR
    keeper: np.ndarray  # int64: the row a dropped record duplicates (-1: an index entry)
    index_match: dict[int, str]  # row -> id of the index entry it duplicates
    keeper_ids: dict[int, str]

    def batch(self, start: int, n: int) -> list[tuple[str, str] | None]:
        out: list[tuple[str, str] | None] = []
        for row in range(start, start + n):
            s = int(self.status[row])
            if s == KEEP:
                out.append(None)
                continue
            reason = EXACT if s == DROP_EXACT else MINHASH
            k = int(self.keeper[row])
            out.append((reason, self.index_match[row] if k < 0 else self.keeper_ids[k]))
        return out


def _scores(table: pa.Table) -> list[float | None]:
    if "quality_score" not in table.column_names:
        return [None] * table.num_rows
    return [None if s is None else float(s) for s in table.column("quality_score").to_pylist()]


def decide(
    batches: Batches,
    settings: DedupSettings,
    index: DedupIndex | None = None,
    work: Path | None = None,
) -> StreamVerdicts:
    """Passes 1 and 2 (see the module docstring)."""
    with tempfile.TemporaryDirectory(dir=work) as tmp:
        store = CandidateStore(Path(tmp), settings.params)
        seen_ids: dict[bytes, int] = {}
        index_exact: dict[int, str] = {}
        index_near: dict[int, str] = {}
        row = 0
        for table in batches():
            ids = [str(i) for i in table.column("id").to_pylist()]
            for k, i in enumerate(ids):
                digest = hashlib.blake2b(i.encode("utf-8"), digest_size=16).digest()
                if digest in seen_ids:
                    raise DuplicateIdError(
                        f"id {i!r} appears twice (records {seen_ids[digest] + 1}, {row + k + 1})"
                    )
                seen_ids[digest] = row + k
            ws = [words(t or "") for t in table.column("text").to_pylist()]
            keys = np.array([exact_key(w) if w else 0 for w in ws], dtype=np.uint64)
            sigs, has = signatures(ws, settings.params)
            worded = np.flatnonzero(has)
            if index is not None and worded.size:
                if settings.exact:
                    for r, m in zip(worded.tolist(), index.lookup_exact(keys[worded]), strict=True):
                        if m is not None:
                            index_exact[row + r] = m.id
                if settings.minhash:
                    found = index.lookup_near(sigs[worded], settings.jaccard_threshold)
                    for r, m in zip(worded.tolist(), found, strict=True):
                        if m is not None:
                            index_near[row + r] = m.id
            store.append(
                [str(row + k) for k in range(len(ids))], sigs, scores=_scores(table),
                exact=keys, topics=[0] * len(ids), tokens=[0] * len(ids), chunk=0, has_sig=has,
            )  # fmt: skip
            row += len(ids)
        del seen_ids
        status, keeper = _resolve(store, settings, index_exact, index_near)
    wanted = set(np.unique(keeper[keeper >= 0]).tolist())
    keeper_ids: dict[int, str] = {}
    row = 0
    for table in batches():  # pass 2: the ids of the records others duplicate
        if wanted:
            for k, i in enumerate(table.column("id").to_pylist()):
                if row + k in wanted:
                    keeper_ids[row + k] = str(i)
        row += table.num_rows
    return StreamVerdicts(status, keeper, {**index_near, **index_exact}, keeper_ids)


def _resolve(
    store: CandidateStore,
    settings: DedupSettings,
    index_exact: dict[int, str],
    index_near: dict[int, str],
) -> tuple[np.ndarray, np.ndarray]:
    """Every record's verdict, in the engine's order of precedence."""
    n = store.count
    meta = store.meta()
    status = np.zeros(n, dtype=np.int8)
    keeper = np.full(n, -1, dtype=np.int64)
    worded = meta["has_sig"] != 0
    scores: list[float | None] = [None if s != s else float(s) for s in meta["score"].tolist()]
    if settings.exact:
        for r in index_exact:
            status[r] = DROP_EXACT
        todo = np.flatnonzero(worded & (status == KEEP))
        order = todo[np.argsort(meta["exact"][todo], kind="stable")]
        keys = meta["exact"][order]
        starts = np.flatnonzero(np.concatenate([[True], keys[1:] != keys[:-1]]))
        first = order[np.repeat(starts, np.diff(np.concatenate([starts, [order.size]])))]
        pairs = np.stack([first, order], axis=1)[first != order]
        for dropped, kept in resolve_clusters(n, pairs, scores).items():
            status[dropped], keeper[dropped] = DROP_EXACT, kept
    if settings.minhash:
        for r in index_near:
            if status[r] == KEEP:
                status[r] = DROP_NEAR
        rows = np.flatnonzero(worded & (status == KEEP))
        for dropped, kept in store.resolve(settings.jaccard_threshold, rows).items():
            status[dropped], keeper[dropped] = DROP_NEAR, kept
    return status, keeper
