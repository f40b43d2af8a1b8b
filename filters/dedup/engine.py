"""Dedup on plain columns (ids, texts, scores): what the filters and `booksmith dedup` share.

Order: documents that duplicate an indexed (earlier) document are dropped first, as duplicates
of that entry; then duplicates within the input are clustered and one per cluster is kept
(cluster.py's rule). Exact duplicates are settled before near-duplicates, so `dedup_exact` wins
when both apply. Documents with no words (empty, whitespace or punctuation only) are never
dropped here: the empty filter owns them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from booksmith.filters.dedup.cluster import resolve
from booksmith.filters.dedup.index import DedupIndex
from booksmith.filters.dedup.lsh import band_keys, candidate_pairs, verified_pairs
from booksmith.filters.dedup.minhash import signatures
from booksmith.filters.dedup.normalize import exact_key, words
from booksmith.schemas.dedup_settings import DedupSettings

EXACT = "dedup_exact"
MINHASH = "dedup_minhash"


def duplicate_evidence(run_id: str, jaccard: float) -> dict[str, Any]:
    """A duplicate's `detail`: the run holding the document it matched (`duplicate_of`) and
    their estimated Jaccard, so a reader (`booksmith view`) can show the pair side by side."""
    return {"matched_run": run_id, "jaccard": round(float(jaccard), 4)}


@dataclass(frozen=True)
class Verdict:
    reason: str  # EXACT or MINHASH
    duplicate_of: str  # id of the kept (or indexed) document


def _exact_keys(ws: Sequence[list[bytes]]) -> np.ndarray:
    return np.fromiter((exact_key(w) for w in ws), dtype=np.uint64, count=len(ws))


def find_exact(
    ids: Sequence[str],
    ws: Sequence[list[bytes]],
    scores: Sequence[float | None],
    verdicts: list[Verdict | None],
    index: DedupIndex | None = None,
) -> None:
    """Mark exact duplicates (of the index, then within the input) in `verdicts`."""
    todo = [i for i, w in enumerate(ws) if w and verdicts[i] is None]
    if not todo:
        return
    keys = _exact_keys([ws[i] for i in todo])
    if index is not None:
        for i, match in zip(todo, index.lookup_exact(keys), strict=True):
            if match is not None:
                verdicts[i] = Verdict(EXACT, match.id)
    groups: dict[int, list[int]] = {}
    for i, key in zip(todo, keys.tolist(), strict=True):
        if verdicts[i] is None:
            groups.setdefault(key, []).append(i)
    pairs = [(g[0], m) for g in groups.values() if len(g) > 1 for m in g[1:]]
    for dropped, kept in resolve(len(ids), pairs, scores).items():
        verdicts[dropped] = Verdict(EXACT, ids[kept])


def find_near(
    ids: Sequence[str],
    ws: Sequence[list[bytes]],
    scores: Sequence[float | None],
    verdicts: list[Verdict | None],
    settings: DedupSettings,
    index: DedupIndex | None = None,
) -> None:
    """Mark MinHash near-duplicates (of the index, then within the input) in `verdicts`."""
    params = settings.params
    threshold = settings.jaccard_threshold
    todo = np.array([i for i, w in enumerate(ws) if w and verdicts[i] is None], dtype=np.int64)
    if todo.size == 0:
        return
    sigs, _ = signatures([ws[i] for i in todo], params)
    if index is not None:
        for k, match in enumerate(index.lookup_near(sigs, threshold)):
            if match is not None:
                verdicts[int(todo[k])] = Verdict(MINHASH, match.id)
        left = np.array([verdicts[int(i)] is None for i in todo], dtype=bool)
        todo, sigs = todo[left], sigs[left]
    pairs = verified_pairs(
        sigs, candidate_pairs(band_keys(sigs, params.bands, params.rows)), threshold
    )
    sub_scores = [scores[int(i)] for i in todo]
    for dropped, kept in resolve(len(todo), pairs, sub_scores).items():
        verdicts[int(todo[dropped])] = Verdict(MINHASH, ids[int(todo[kept])])


def find_duplicates(
    ids: Sequence[str],
    texts: Sequence[str],
    scores: Sequence[float | None] | None = None,
    settings: DedupSettings | None = None,
    index: DedupIndex | None = None,
) -> list[Verdict | None]:
    """One verdict per document: None to keep it, else why it goes and what it duplicates."""
    settings = settings or DedupSettings()
    scores = scores if scores is not None else [None] * len(ids)
    ws = [words(t) for t in texts]
    verdicts: list[Verdict | None] = [None] * len(ids)
    if settings.exact:
        find_exact(ids, ws, scores, verdicts, index)
    if settings.minhash:
        find_near(ids, ws, scores, verdicts, settings, index)
    return verdicts


def index_entries(
    ids: Sequence[str], texts: Sequence[str], settings: DedupSettings | None = None
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """What a persistent index stores for these documents: ids, signatures, exact keys
    (documents without words left out)."""
    settings = settings or DedupSettings()
    ws = [words(t) for t in texts]
    keep = [i for i, w in enumerate(ws) if w]
    kept_ws = [ws[i] for i in keep]
    sigs, _ = signatures(kept_ws, settings.params)
    return [ids[i] for i in keep], sigs, _exact_keys(kept_ws)
