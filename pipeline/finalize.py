"""The end of a streaming run: decide the near-duplicate clusters, then write the version.

Why two passes: a MinHash cluster keeps its best document by quality score across the whole
run, so no chunk can publish its candidates before the last chunk is filtered. After it,
`CandidateStore.resolve()` decides every cluster from the spilled band keys and signatures
(about 150 bytes a candidate in memory), and one streaming pass over the chunk spills, in
plan order, writes the kept rows to the text shards and the rest to the rejected shards
(the losers of a cluster with `dedup_minhash` and the id of the document their cluster
kept). Memory holds one chunk's rows at a time; token shards are then written from the
finished text shards (shards/dataset.VersionWriter).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from booksmith.filters.dedup import MINHASH, DedupIndex
from booksmith.filters.dedup.engine import duplicate_evidence
from booksmith.filters.dedup.index import Entries
from booksmith.filters.dedup.lsh import estimated_jaccard
from booksmith.generation.diversity import DiversitySample
from booksmith.pipeline.chunks import CANDIDATE, RunState
from booksmith.schemas.manifest import Diversity, QualityHistogram
from booksmith.shards.dataset import VersionWriter

BINS = 10
COMMIT_ROWS = 8192  # candidates read from the store at a time by the index commit


@dataclass
class Tally:
    """What the run keeps so far (the fill account's input)."""

    per_topic: Counter[str]
    documents: int
    tokens: int


def tally(state: RunState) -> Tally:
    """Kept documents so far, near-duplicate clusters decided over every chunk processed."""
    store = state.store
    dropped = store.resolve(state.dedup.jaccard_threshold) if state.dedup.minhash else {}
    meta = store.meta()
    kept = store.kept_mask(dropped)
    keys = {i: k for k, i in state.near.topics.items()}
    counts = np.bincount(meta["topic"][kept], minlength=len(keys))
    per_topic = Counter({keys[i]: int(n) for i, n in enumerate(counts.tolist()) if n})
    return Tally(per_topic, int(kept.sum()), int(meta["tokens"][kept].sum()))


def quality_bins(scores: pa.ChunkedArray) -> list[int]:
    """Scores counted in the manifest's BINS equal bins (a score of 1.0 in the last)."""
    values = [x for x in scores.to_pylist() if x is not None]
    out = [0] * BINS
    for x in values:
        out[min(BINS - 1, max(0, int(x * BINS)))] += 1
    return out


def _cluster_verdicts(
    table: pa.Table, state: RunState, dropped: dict[int, int], keeper_id: dict[int, str]
) -> pa.Table:
    """A spilled chunk with the run's near-duplicate verdicts applied: each candidate its
    cluster dropped becomes a MINHASH reject of the kept one, with the evidence (this run,
    their estimated Jaccard) in `detail`."""
    cand = table.column("cand_row").to_pylist()
    reasons = table.column("reason").to_pylist()
    dup_of = table.column("duplicate_of").to_pylist()
    detail = table.column("detail").to_pylist()
    run_ids = table.column("run_id").to_pylist()
    at = [i for i, row in enumerate(cand) if row >= 0 and row in dropped]
    if not at:
        return table
    rows = np.array([cand[i] for i in at], dtype=np.int64)
    keepers = np.array([dropped[int(r)] for r in rows], dtype=np.int64)
    jaccard = estimated_jaccard(state.store.signatures(rows), state.store.signatures(keepers))
    for i, keeper, j in zip(at, keepers.tolist(), jaccard.tolist(), strict=True):
        reasons[i], dup_of[i] = MINHASH, keeper_id[keeper]
        detail[i] = json.dumps(duplicate_evidence(run_ids[i], j))
    for name, values in (("reason", reasons), ("duplicate_of", dup_of), ("detail", detail)):
        table = table.set_column(
            table.schema.get_field_index(name), name, pa.array(values, pa.string())
        )
    return table


@dataclass
class Finished:
    documents: int
    rejected: int
    dropped_in_run: int
    kept_rows: np.ndarray  # candidate-store rows kept (for the index commit)
    quality: QualityHistogram
    diversity: Diversity


def write_chunks(
    state: RunState, version: VersionWriter, axes: Mapping[str, Sequence[str]]
) -> Finished:
    """The streaming pass (see the module docstring)."""
    store = state.store
    dropped = store.resolve(state.dedup.jaccard_threshold) if state.dedup.minhash else {}
    keepers = np.unique(np.fromiter(dropped.values(), dtype=np.int64, count=len(dropped)))
    keeper_id = dict(zip(keepers.tolist(), store.ids(keepers), strict=True))
    sample = DiversitySample(axes)
    hist = {"kept": [0] * BINS, "rejected": [0] * BINS}
    rejected_rows = 0
    for number in range(state.chunks):
        table = _cluster_verdicts(
            pq.read_table(state.chunk_path(number)), state, dropped, keeper_id
        )
        is_kept = pc.equal(table.column("reason"), CANDIDATE)
        kept, rejected = table.filter(is_kept), table.filter(pc.invert(is_kept))
        version.add_kept(kept)
        version.add_rejected(rejected)
        rejected_rows += rejected.num_rows
        for name, part in (("kept", kept), ("rejected", rejected)):
            bins = quality_bins(part["quality_score"])
            hist[name] = [a + b for a, b in zip(hist[name], bins, strict=True)]
        version.failures.write_table(pq.read_table(state.failures_path(number)))
        axis_rows = kept.select(list(axes)).to_pylist()
        sample.add(kept["id"].to_pylist(), kept["text"].to_pylist(), axis_rows)
    return Finished(
        documents=version.documents,
        rejected=rejected_rows,
        dropped_in_run=len(dropped),
        kept_rows=np.flatnonzero(store.kept_mask(dropped)),
        quality=QualityHistogram(edges=[i / BINS for i in range(BINS + 1)], **hist),
        diversity=Diversity.model_validate(sample.report()),
    )


def commit_index(index: DedupIndex | None, state: RunState, run_id: str, rows: np.ndarray) -> int:
    """Add the kept documents to the persistent index with the signatures and exact keys they
    were judged by (nothing is computed again), read from the candidate store a block at a
    time (COMMIT_ROWS): the run's signatures never sit in memory together. Only after the
    version's manifest exists."""
    if index is None:
        return 0
    store = state.store
    meta = store.meta()
    rows = rows[meta["has_sig"][rows] != 0]
    exact = meta["exact"].copy()  # a copy: a field view would keep all of `meta` alive
    del meta

    def blocks() -> Iterator[tuple[list[str], np.ndarray, np.ndarray]]:
        for start in range(0, len(rows), COMMIT_ROWS):
            part = rows[start : start + COMMIT_ROWS]
            yield store.ids(part), store.signatures(part), exact[part]

    return index.add_entries(run_id, Entries(len(rows), blocks))
