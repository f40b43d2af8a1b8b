"""The exact-dedup map of a streaming run, over every chunk so far (see ExactStage).

Its keys live in memory as a SortedKeys (16 bytes a document; why not a dict:
generation/sorted_keys.py), each key's first id in the run's append-only `exact.bin`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from booksmith.generation.sorted_keys import SortedKeys

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
