"""Text helpers the rule modules share: word ids and vectorised n-gram hashes."""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

# Random odd 64-bit multipliers, one per position in the window (fixed, so hashes are stable
# across processes): hash(window) = sum((id_j + 1) * R_j) mod 2**64.
_R = (np.random.default_rng(20240613).integers(0, 2**63, size=64, dtype=np.uint64) << 1) | 1


def word_ids(words: list[str]) -> np.ndarray:
    """Each word's id in this document (first-seen order), as uint64."""
    vocab: dict[str, int] = {}
    ids = [vocab.setdefault(w, len(vocab)) for w in words]
    return np.fromiter(ids, dtype=np.uint64, count=len(ids))


def ngram_hashes(ids: np.ndarray, n: int) -> np.ndarray:
    """A 64-bit hash of every window of n ids (len(ids) - n + 1 values), in one matrix product.

    Collisions are possible but, at 64 bits, far rarer than the decisions they could change.
    """
    assert 1 <= n <= len(_R), f"n-grams up to {len(_R)} words"
    if len(ids) < n:
        return np.empty(0, dtype=np.uint64)
    windows = sliding_window_view(ids + np.uint64(1), n)
    hashes: np.ndarray = windows @ _R[:n]
    return hashes
