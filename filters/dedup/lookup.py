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
from typing import BinaryIO

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from booksmith.filters.dedup.lsh import band_keys, pair_jaccard
from booksmith.filters.dedup.minhash import MinHashParams

TABLES = ("sigs", "bands", "border", "exact", "eorder", "ids")
BLOCK_ROWS = 8192


def _row_dtype(n: int) -> type[np.unsignedinteger]:
    return np.uint32 if n < 2**32 else np.uint64


def _npy(path: Path, dtype: str, shape: tuple[int, ...]) -> BinaryIO:
    """An open `.npy` file whose header says `dtype` and `shape`; the caller writes the data."""
    f = open(path, "wb")  # noqa: SIM115 (closed by the caller's with-block)
    header = {"descr": np.dtype(dtype).str, "fortran_order": False, "shape": shape}
    np.lib.format.write_array_header_1_0(f, header)
    return f


def _sig_block(column: pa.Array, num_perm: int) -> np.ndarray:
    """A fixed_size_binary column of signatures as an (n, num_perm) uint32 view."""
    n = len(column)
    data = np.frombuffer(column.buffers()[1], dtype="<u4")
    start = column.offset * num_perm
    return data[start : start + n * num_perm].reshape(n, num_perm)


def build(segment: Path, target: Path, params: MinHashParams, sha256: str) -> None:
    """Write the lookup tables of one segment file (id, exact, sig) into `target`, reading the
    segment a block of rows at a time: memory holds the band keys and exact keys (120 bytes a
    row) and one band's sort, never the segment's signatures or ids."""
    source = pq.ParquetFile(segment)
    n, num_perm = source.metadata.num_rows, params.num_perm
    row = np.dtype(_row_dtype(n)).str
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    keys = np.empty((params.bands, n), dtype=np.uint64)  # band-major: each band sorts alone
    exact = np.empty(n, dtype=np.uint64)
    width, at = 1, 0
    with _npy(tmp / "sigs.npy", "<u4", (n, num_perm)) as out:
        for batch in source.iter_batches(BLOCK_ROWS, columns=["sig", "exact", "id"]):
            sigs = _sig_block(batch.column("sig"), num_perm)
            m = len(sigs)
            keys[:, at : at + m] = band_keys(sigs, params.bands, params.rows).T
            exact[at : at + m] = batch.column("exact").to_numpy()
            if m:
                width = max(width, pc.max(pc.binary_length(batch.column("id"))).as_py())
            out.write(np.ascontiguousarray(sigs, dtype="<u4").tobytes())
            at += m
    with (
        _npy(tmp / "bands.npy", "<u8", (params.bands, n)) as bands,
        _npy(tmp / "border.npy", row, (params.bands, n)) as border,
    ):
        for b in range(params.bands):
            order = np.argsort(keys[b], kind="stable")
            bands.write(keys[b][order].astype("<u8").tobytes())
            border.write(order.astype(row).tobytes())
            del order
    del keys
    eorder = np.argsort(exact, kind="stable")
    np.save(tmp / "exact.npy", exact[eorder].astype("<u8"))
    np.save(tmp / "eorder.npy", eorder.astype(row))
    del exact, eorder
    with _npy(tmp / "ids.npy", f"S{width}", (n,)) as out:
        for batch in source.iter_batches(BLOCK_ROWS, columns=["id"]):
            ids = [i.encode("utf-8") for i in batch.column("id").to_pylist()]
            out.write(np.array(ids, dtype=f"S{width}").tobytes())
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
