"""A run's growing sets of 64-bit keys, kept in sorted NumPy arrays.

Why not a dict or a set: a run adds a key for every request it plans and every document exact
dedup keeps, chunk after chunk, and each Python int (and each id string a dict held) is a small
object allocated among the chunk's short-lived ones. They outlive the chunk and pin the
allocator's pools it shared with them, so a run's memory grew by about 2 KB a request where
the keys themselves are 16 bytes (BENCHMARKS.md, run_scale). Here a key costs 16 bytes, in two
arrays, and a chunk's keys are merged in one pass.
"""

from __future__ import annotations

import numpy as np


class SortedKeys:
    """uint64 keys, each with an int64 value (a row number, say), sorted by key."""

    def __init__(self) -> None:
        self.keys = np.empty(0, dtype=np.uint64)
        self.values = np.empty(0, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.keys)

    def find(self, keys: np.ndarray) -> np.ndarray:
        """Each key's value, -1 where the key is absent."""
        keys = np.asarray(keys, dtype=np.uint64)
        at = np.searchsorted(self.keys, keys)
        hit = at < len(self.keys)
        hit[hit] = self.keys[at[hit]] == keys[hit]
        out = np.full(len(keys), -1, dtype=np.int64)
        out[hit] = self.values[at[hit]]
        return out

    def add(self, keys: np.ndarray, values: np.ndarray) -> None:
        """Add keys with their values (>= 0). A key held already is held twice: harmless to
        `in`, but `find` may give either value, so FirstIds adds only keys it has not seen."""
        keys = np.asarray(keys, dtype=np.uint64)
        if not len(keys):
            return
        order = np.argsort(keys, kind="stable")
        keys, values = keys[order], np.asarray(values, dtype=np.int64)[order]
        at = np.searchsorted(self.keys, keys)
        self.keys = np.insert(self.keys, at, keys)
        self.values = np.insert(self.values, at, values)

    def position(self, key: int) -> int:
        """Where one key sits in `keys` (and its value in `values`), -1 when absent."""
        at = int(np.searchsorted(self.keys, np.uint64(key)))
        return at if at < len(self.keys) and int(self.keys[at]) == key else -1

    def __contains__(self, key: int) -> bool:
        return self.position(key) >= 0


class Repeats:
    """How often each 64-bit key was seen, for a plan that numbers repeats of a prompt: the
    keys of the last FLUSH new keys in a dict, the rest merged into SortedKeys, so that no
    Python object per key outlives a chunk."""

    FLUSH = 4096

    def __init__(self) -> None:
        self.old = SortedKeys()
        self.new: dict[int, int] = {}

    def next(self, key: int) -> int:
        """0 the first time `key` is seen, then 1, 2, ..."""
        if key in self.new:
            self.new[key] += 1
            return self.new[key]
        if (at := self.old.position(key)) >= 0:
            self.old.values[at] += 1
            return int(self.old.values[at])
        self.new[key] = 0
        if len(self.new) >= self.FLUSH:
            self.old.add(np.fromiter(self.new, np.uint64), np.fromiter(self.new.values(), np.int64))
            self.new = {}
        return 0
