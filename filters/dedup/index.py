"""The persistent dedup index: every earlier run's kept documents, so a run can drop what an
earlier night already produced.

Two stores with one interface (`DedupIndex`):

- `FileIndex` (file_index.py), the default: a directory beside the datasets.
- `RedisIndex` (redis_index.py), for many workers: datasketch's MinHashLSH on Redis.

Entries are tagged with their run id; adding a run that is already there replaces it, so a
commit can be retried. Documents without words are never indexed. An index holds hashes and
signatures, never text; a taken-down document's entries stay (so its text is still found as a
duplicate and kept out) and are flagged as taken down (`taken_down()`: id -> run id).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import numpy as np

from booksmith.filters.dedup.minhash import SCHEME, MinHashParams
from booksmith.filters.dedup.normalize import NORMALIZER_VERSION

FORMAT = "booksmith-minhash-index"
VERSION = 1
_MAX_BUCKET = 256  # entries checked per (query, band): any one near-duplicate is enough


class DedupIndexError(ValueError):
    """An index that cannot be used (corrupt, foreign, other parameters); names the file or key."""


@dataclass(frozen=True)
class Match:
    id: str
    run_id: str
    jaccard: float


def index_params(params: MinHashParams) -> dict[str, Any]:
    """What must agree between an index and the signatures checked against it."""
    return {**asdict(params), "scheme": SCHEME, "normalizer": NORMALIZER_VERSION}


@dataclass(frozen=True)
class Entries:
    """One run's entries for `DedupIndex.add_entries`, read a block at a time so that a run's
    documents never sit in memory together: each call of `blocks()` starts a new pass over
    (ids, signatures (n, num_perm) uint32, exact keys (n,) uint64)."""

    count: int
    blocks: Callable[[], Iterable[tuple[Sequence[str], np.ndarray, np.ndarray]]]

    @staticmethod
    def of(ids: Sequence[str], sigs: np.ndarray, exact: np.ndarray) -> Entries:
        """Entries held in memory already, as one block."""
        if len(ids) != sigs.shape[0] or len(ids) != exact.shape[0]:
            raise ValueError("ids, signatures and exact keys differ in length")
        return Entries(len(ids), lambda: [(ids, sigs, exact)])


class DedupIndex(Protocol):
    params: MinHashParams

    def lookup_exact(self, keys: np.ndarray) -> list[Match | None]: ...

    def lookup_near(self, sigs: np.ndarray, threshold: float) -> list[Match | None]: ...

    def add(self, run_id: str, ids: Sequence[str], sigs: np.ndarray, exact: np.ndarray) -> int: ...

    def add_entries(self, run_id: str, entries: Entries) -> int: ...

    def remove_run(self, run_id: str) -> int: ...

    def runs(self) -> dict[str, int]: ...

    def flag_taken_down(self, ids: Iterable[str]) -> int: ...

    def taken_down(self) -> dict[str, str]: ...

    def close(self) -> None: ...
