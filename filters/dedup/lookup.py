"""Memory-mapped lookup tables for one segment of the file index, so that a query never loads
the index into memory.

A segment (one run's Parquet file) gets a directory beside it, `lookup/<segment>/`, of plain
`.npy` arrays opened with `mmap_mode="r"`:

    sigs.npy     (n, num_perm) uint32   signatures, read only for the rows banding proposes
    bands.npy    (bands, n)    uint64   each band's keys, sorted
    border.npy   (bands, n)    uint32   the row each sorted band key belongs to
    exact.npy    (n,)          uint64   exact keys, sorted (stable: the earliest row first)
    eorder.npy   (n,)          uint32   the row of each sorted exact key
    ids.npy      (n,)          S<w>     ids, fixed width

A query batch searches each band's sorted keys (a binary search touches a few pages), gathers
at most `max_bucket` rows per (query, band), and checks their signatures: the pages a lookup
touches are those it needs, so a process's memory does not grow with the index behind it. The
tables are derived data: built when a segment is written, or on first use for an index written
before them, under a temporary name and renamed; `meta.json` ties them to the segment's sha256,
and tables that do not match are built again.
"""

from __future__ import annotations

import json
import mmap
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa

from booksmith.filters.dedup.lsh import band_keys, pair_jaccard
from booksmith.filters.dedup.minhash import MinHashParams

TABLES = ("sigs", "bands", "border", "exact", "eorder", "ids")
BLOCK_ROWS = 8192


def _row_dtype(n: int) -> type[np.unsignedinteger]:
    return np.uint32 if n < 2**32 else np.uint64


def build(table: pa.Table, target: Path, params: MinHashParams, sha256: str) -> None:
    """Write the lookup tables of one segment table (id, exact, sig) into `target`."""
    n, num_perm = table.num_rows, params.num_perm
    sig_col = table.column("sig").combine_chunks()
    if n:
        data = np.frombuffer(sig_col.buffers()[1], dtype="<u4")
        start = sig_col.offset * num_perm
        sigs = data[start : start + n * num_perm].reshape(n, num_perm)
    else:
        sigs = np.zeros((0, num_perm), dtype=np.uint32)
    # Band keys a block of rows at a time (band_keys widens the block's signatures to 64 bits:
    # 900 bytes a row), then each band sorted on its own: memory stays near the keys' size.
    keys = np.empty((n, params.bands), dtype=np.uint64)
    for start in range(0, n, BLOCK_ROWS):
        block = sigs[start : start + BLOCK_ROWS]
        keys[start : start + len(block)] = band_keys(block, params.bands, params.rows)
    border = np.empty((params.bands, n), dtype=_row_dtype(n))
    bands = np.empty((params.bands, n), dtype=np.uint64)
    for b in range(params.bands):
        order = np.argsort(keys[:, b], kind="stable")
        border[b] = order
        bands[b] = keys[order, b]
    del keys
    exact = table.column("exact").to_numpy()
    eorder = np.argsort(exact, kind="stable").astype(_row_dtype(n))
    ids = [str(i).encode("utf-8") for i in table.column("id").to_pylist()]
    width = max((len(i) for i in ids), default=1)
    arrays = {
        "sigs": np.ascontiguousarray(sigs, dtype="<u4"),
        "bands": np.ascontiguousarray(bands, dtype="<u8"),
        "border": np.ascontiguousarray(border),
        "exact": np.ascontiguousarray(exact[eorder], dtype="<u8"),
        "eorder": eorder,
        "ids": np.array(ids, dtype=f"S{width}"),
    }
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name, array in arrays.items():
        np.save(tmp / f"{name}.npy", array)
    (tmp / "meta.json").write_text(json.dumps({"rows": n, "sha256": sha256}))
    shutil.rmtree(target, ignore_errors=True)
    try:
        os.rename(tmp, target)
    except OSError:  # another process built the same tables first
        shutil.rmtree(tmp, ignore_errors=True)


class SegmentLookup:
    """The memory-mapped tables of one segment (see the module docstring)."""

    def __init__(self, root: Path, rows: int) -> None:
        self.rows = rows
        arrays = {name: np.load(root / f"{name}.npy", mmap_mode="r") for name in TABLES}
        self.sigs, self.bands, self.border = arrays["sigs"], arrays["bands"], arrays["border"]
        self.exact, self.eorder, self.ids = arrays["exact"], arrays["eorder"], arrays["ids"]
        self._maps = [m for a in arrays.values() if (m := getattr(a, "_mmap", None)) is not None]
        for m in self._maps:  # binary searches jump about: reading ahead only fills memory
            m.madvise(mmap.MADV_RANDOM)

    def release(self) -> None:
        """Unmap the pages the last lookups touched: they stay in the page cache, but not in
        this process's memory, so a run that looks up every chunk stays flat."""
        for m in self._maps:
            m.madvise(mmap.MADV_DONTNEED)

    @staticmethod
    def current(root: Path, rows: int, sha256: str | None) -> bool:
        try:
            meta = json.loads((root / "meta.json").read_text())
        except (OSError, ValueError):
            return False
        return bool(meta.get("rows") == rows and (sha256 is None or meta.get("sha256") == sha256))

    def id(self, row: int) -> str:
        return bytes(self.ids[row]).rstrip(b"\0").decode("utf-8")

    def lookup_exact(self, keys: np.ndarray) -> np.ndarray:
        """For each key, the earliest row with that exact key, or -1."""
        out = np.full(len(keys), -1, dtype=np.int64)
        if self.rows == 0 or len(keys) == 0:
            return out
        pos = np.minimum(np.searchsorted(self.exact, keys), self.rows - 1)
        hit = np.asarray(self.exact[pos]) == keys
        out[hit] = np.asarray(self.eorder[pos[hit]], dtype=np.int64)
        return out

    def candidates(
        self, keys: np.ndarray, max_bucket: int, sigs: np.ndarray, threshold: float
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(query, row, estimated Jaccard) of every verified pair, each pair once."""
        n = keys.shape[0]
        qs: list[np.ndarray] = []
        rows: list[np.ndarray] = []
        for b in range(self.bands.shape[0]):
            sorted_keys = self.bands[b]
            lo = np.searchsorted(sorted_keys, keys[:, b], side="left")
            hi = np.searchsorted(sorted_keys, keys[:, b], side="right")
            count = np.minimum(hi - lo, max_bucket)
            if not count.any():
                continue
            q = np.repeat(np.arange(n), count)
            within = np.arange(int(count.sum())) - np.repeat(np.cumsum(count) - count, count)
            qs.append(q)
            rows.append(np.asarray(self.border[b][np.repeat(lo, count) + within], dtype=np.int64))
        empty = np.empty(0, dtype=np.int64)
        if not qs:
            return empty, empty, np.empty(0)
        pairs = np.unique(np.stack([np.concatenate(qs), np.concatenate(rows)], axis=1), axis=0)
        est = pair_jaccard(sigs, pairs[:, 0], self.sigs, pairs[:, 1])
        ok = est >= threshold
        return pairs[ok, 0], pairs[ok, 1], est[ok]
