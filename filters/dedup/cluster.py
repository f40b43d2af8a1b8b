"""Duplicate clusters and which member each keeps.

Rule: documents linked by verified duplicate pairs form clusters (union-find, so links are
transitive, as in datatrove's MinhashDedupCluster). Each cluster keeps one document: the one
with the highest `quality_score`, a document without a score ranking below every scored one,
and among equals the earliest in input order. Every other member is dropped as a duplicate of
the kept one (`duplicate_of` names it even when the two were linked through a third).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np


class UnionFind:
    def __init__(self, n: int) -> None:
        self.parent = list(range(n))

    def find(self, x: int) -> int:
        parent = self.parent
        while parent[x] != x:
            parent[x] = parent[parent[x]]  # path halving keeps trees shallow
            x = parent[x]
        return x

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            # The smaller index becomes the root: deterministic, whatever the pair order.
            if rb < ra:
                ra, rb = rb, ra
            self.parent[rb] = ra


def _rank(scores: Sequence[float | None], i: int) -> tuple[bool, float, int]:
    s = scores[i]
    return (s is not None and s == s, s if s is not None and s == s else 0.0, -i)


def resolve(
    n: int, pairs: Iterable[tuple[int, int]] | np.ndarray, scores: Sequence[float | None]
) -> dict[int, int]:
    """Map each dropped document to the document its cluster keeps."""
    uf = UnionFind(n)
    members: set[int] = set()
    for a, b in np.asarray(pairs, dtype=np.int64).reshape(-1, 2).tolist():
        uf.union(a, b)
        members.update((a, b))
    clusters: dict[int, list[int]] = {}
    for m in sorted(members):
        clusters.setdefault(uf.find(m), []).append(m)
    dropped: dict[int, int] = {}
    for group in clusters.values():
        keep = max(group, key=lambda i: _rank(scores, i))
        for m in group:
            if m != keep:
                dropped[m] = keep
    return dropped
