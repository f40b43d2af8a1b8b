"""A run's growing sets of 64-bit keys, kept in sorted NumPy arrays.

Why not a dict or a set: a run adds a key for every request it plans and every document exact
dedup keeps, chunk after chunk, and each Python int (and each id string a dict held) is a small
object allocated among the chunk's short-lived ones. They outlive the chunk and pin the
allocator's pools it shared with them, so a run's memory grew by about 2 KB a request where
the keys themselves are 16 bytes (BENCHMARKS.md, run_scale). Here a key costs 16 bytes, in two
arrays, and a chunk's keys are merged in one pass.
"""

from __future__ import annotations

from pathlib import Path

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

    def contains(self, keys: np.ndarray) -> np.ndarray:
        return self.find(keys) >= 0

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

    def __contains__(self, key: int) -> bool:
        at = int(np.searchsorted(self.keys, np.uint64(key)))
        return at < len(self.keys) and int(self.keys[at]) == key


ROW = np.dtype([("key", "<u8"), ("id", "S64")])


class FirstIds:
    """Exact key -> the id of its first document, over every chunk of a run so far: the keys
    sorted in memory (16 bytes each, the value a row number), the (key, id) rows appended to
    `path`, read back for a duplicate's id and to rebuild the keys when a run resumes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.touch()
        self.keys = SortedKeys()
        self.rows = 0

    def ids(self, keys: np.ndarray) -> list[str | None]:
        """The first id of each key, None for a key not seen."""
        rows = self.keys.find(keys)
        out: list[str | None] = [None] * len(rows)
        hit = np.flatnonzero(rows >= 0)
        if len(hit):
            table = np.memmap(self.path, dtype=ROW, mode="r", shape=(self.rows,))
            for i, row in zip(hit.tolist(), rows[hit].tolist(), strict=True):
                out[i] = bytes(table[row]["id"]).decode("ascii")
            del table
        return out

    def add(self, pairs: list[tuple[int, str]]) -> None:
        """Keys not seen yet, each with its first document's id (ASCII, at most 64 bytes)."""
        if not pairs:
            return
        rows = np.zeros(len(pairs), dtype=ROW)
        rows["key"] = [k for k, _ in pairs]
        rows["id"] = [i.encode("ascii") for _, i in pairs]
        with open(self.path, "ab") as f:
            f.write(rows.tobytes())
        self.keys.add(rows["key"], np.arange(self.rows, self.rows + len(rows)))
        self.rows += len(rows)

    def truncate(self, n: int) -> None:
        """Back to the first `n` rows (a checkpoint's), the keys rebuilt from the file."""
        with open(self.path, "r+b") as f:
            f.truncate(n * ROW.itemsize)
        rows = np.fromfile(self.path, dtype=ROW)
        self.keys = SortedKeys()
        self.keys.add(rows["key"], np.arange(len(rows)))
        self.rows = len(rows)
