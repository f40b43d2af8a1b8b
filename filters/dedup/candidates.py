"""Near-duplicate candidates of a streaming run, spilled to disk and resolved once at the end.

A run is a stream of chunks, but a MinHash cluster keeps its best document by quality score
(cluster.py's rule) over the whole run, so a near-duplicate verdict is final only after the last
chunk. Each chunk appends what the decision needs for the documents that passed every other
filter: the signature (112 x uint32), the band keys (14 x uint64), the quality score, the exact
key (for the index commit), the topic and the tokens (for the fill account), and the id. These
are fixed-width rows in append-only files under the run's state directory:

    sigs.u32    (n, num_perm)  read back memory-mapped, only for the pairs that banding proposes
    bands.u64   (n, bands)     loaded whole at resolve time: 112 bytes a document
    meta.bin    score, exact key, topic index, tokens, chunk number, has-words flag: 32 bytes
    ids.bin     the id, ASCII, padded to 64 bytes

`resolve()` runs the same banding, estimated-Jaccard check and union-find as the in-memory
engine (`engine.find_near`) over every candidate in stream order, so the verdicts are the same
whatever the chunk size. `truncate(n)` cuts the files back to a checkpoint's length (a run that
resumes after a kill throws away rows of the chunk it had not finished).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from booksmith.filters.dedup.cluster import resolve as resolve_clusters
from booksmith.filters.dedup.lsh import band_keys, candidate_pairs, pair_jaccard
from booksmith.filters.dedup.minhash import MinHashParams

META = np.dtype(
    [("score", "<f8"), ("exact", "<u8"), ("topic", "<i4"), ("tokens", "<i4"), ("chunk", "<i4"),
     ("has_sig", "<i4")]
)  # fmt: skip
ID_BYTES = 64


class CandidateStore:
    """Append-only columns of the run's near-dup candidates (see the module docstring)."""

    def __init__(self, root: Path, params: MinHashParams) -> None:
        self.root, self.params = root, params
        root.mkdir(parents=True, exist_ok=True)
        self._files: dict[str, tuple[Path, np.dtype[Any], int]] = {
            "sigs": (root / "sigs.u32", np.dtype("<u4"), params.num_perm),
            "bands": (root / "bands.u64", np.dtype("<u8"), params.bands),
            "meta": (root / "meta.bin", META, 1),
            "ids": (root / "ids.bin", np.dtype(f"S{ID_BYTES}"), 1),
        }
        for path, _, _ in self._files.values():
            path.touch()
        self.count = self._rows("meta")
        # The last decision and what it was decided over: the fill account asks after every
        # round and the final pass after the last, over the same rows.
        self._resolved: tuple[tuple[int, float], dict[int, int]] | None = None

    def _rows(self, name: str) -> int:
        path, dtype, width = self._files[name]
        return path.stat().st_size // (dtype.itemsize * width)

    def append(
        self,
        ids: Sequence[str],
        sigs: np.ndarray,
        *,
        scores: Sequence[float | None],
        exact: np.ndarray,
        topics: Sequence[int],
        tokens: Sequence[int],
        chunk: int,
        has_sig: np.ndarray | None = None,
    ) -> None:
        """Rows for these documents; `has_sig` False marks a document with no words (it is
        never a duplicate and never indexed)."""
        n = len(ids)
        if n == 0:
            return
        encoded = [i.encode("ascii") for i in ids]
        if any(len(e) > ID_BYTES for e in encoded):
            raise ValueError(f"a document id is longer than {ID_BYTES} bytes: cannot spill it")
        meta = np.zeros(n, dtype=META)
        meta["score"] = [np.nan if s is None else s for s in scores]
        meta["exact"] = exact
        meta["topic"] = topics
        meta["tokens"] = tokens
        meta["chunk"] = chunk
        meta["has_sig"] = 1 if has_sig is None else has_sig
        columns = {
            "sigs": np.ascontiguousarray(sigs, dtype=np.uint32),
            "bands": band_keys(sigs, self.params.bands, self.params.rows),
            "meta": meta,
            "ids": np.array(encoded, dtype=f"S{ID_BYTES}"),
        }
        for name, data in columns.items():
            with open(self._files[name][0], "ab") as f:
                f.write(data.tobytes())
        self.count += n

    def truncate(self, n: int) -> None:
        """Cut every column back to its first n rows (resume from a checkpoint)."""
        for path, dtype, width in self._files.values():
            with open(path, "r+b") as f:
                f.truncate(n * dtype.itemsize * width)
        self.count = n
        self._resolved = None

    def _load(self, name: str, mmap: bool = False) -> np.ndarray:
        path, dtype, width = self._files[name]
        n = self.count
        if n == 0:
            return np.zeros((0, width) if width > 1 else 0, dtype=dtype)
        shape = (n, width) if width > 1 else (n,)
        if mmap:
            return np.memmap(path, dtype=dtype, mode="r", shape=shape)
        return np.fromfile(path, dtype=dtype, count=n * width).reshape(shape)

    def meta(self) -> np.ndarray:
        return self._load("meta")

    def ids(self, rows: np.ndarray) -> list[str]:
        """The ids of these candidate rows."""
        table = self._load("ids", mmap=True)
        return [bytes(table[int(r)]).rstrip(b"\0").decode("ascii") for r in rows]

    def signatures(self, rows: np.ndarray) -> np.ndarray:
        return np.asarray(self._load("sigs", mmap=True)[rows])

    def resolve(self, threshold: float, rows: np.ndarray | None = None) -> dict[int, int]:
        """Every dropped candidate row -> the row its cluster keeps (stream order breaks ties,
        as the in-memory engine's input order does); only among `rows` when given."""
        if self.count < 2:
            return {}
        if (
            rows is None
            and self._resolved is not None
            and self._resolved[0] == (self.count, threshold)
        ):
            return self._resolved[1]
        dropped = self._resolve(threshold, rows)
        if rows is None:
            self._resolved = ((self.count, threshold), dropped)
        return dropped

    def _resolve(self, threshold: float, rows: np.ndarray | None) -> dict[int, int]:
        meta = self.meta()
        eligible = meta["has_sig"] != 0
        if rows is not None:
            chosen = np.zeros(self.count, dtype=bool)
            chosen[rows] = True
            eligible &= chosen
        rows = np.flatnonzero(eligible)
        pairs = candidate_pairs(self._load("bands")[rows])
        if pairs.size:
            pairs = rows[pairs]  # back to store rows
            sigs = self._load("sigs", mmap=True)
            est = pair_jaccard(sigs, pairs[:, 0], sigs, pairs[:, 1])
            pairs = pairs[est >= threshold]
        ranked: list[float | None] = [None if s != s else float(s) for s in meta["score"].tolist()]
        return resolve_clusters(self.count, pairs, ranked)

    def kept_mask(self, dropped: dict[int, int]) -> np.ndarray:
        mask = np.ones(self.count, dtype=bool)
        if dropped:
            mask[np.fromiter(dropped, dtype=np.int64, count=len(dropped))] = False
        return mask
