"""The file store of the persistent dedup index (see index.py for the interface).

The default: a directory beside the datasets (`<out>/_state/minhash/`). `index.json` (format
name, version, parameters, generation, segment list with rows, bytes and sha256) plus one
immutable Parquet segment per run: id, a 64-bit exact-text key and the full 112 x uint32
signature (448 bytes; about 500 bytes per document with its id). Queries read each segment's
memory-mapped lookup tables (lookup.py: sorted band keys, signatures, exact keys, ids; about
650 bytes a document on disk, built once per segment), never the index itself, so a run's
memory does not grow with the runs behind it. Writes take a lock file, write the segment under
a new name, then replace `index.json` atomically: a crash leaves the old index whole (a new
index writes its empty `index.json` first, so even a crash in the first write leaves one).
`index.json`'s optional `taken_down` (id -> run id) flags the entries of taken-down documents,
which removing their run leaves in place; an index written before it has none and opens as it
did. A
corrupt or foreign `index.json` or segment is an error naming the file; nothing is then
written, so the index is never replaced by less than it held.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import re
import shutil
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from booksmith.filters.dedup.index import (
    _MAX_BUCKET,
    FORMAT,
    VERSION,
    DedupIndexError,
    Entries,
    Match,
    index_params,
)
from booksmith.filters.dedup.lookup import SegmentLookup, build
from booksmith.filters.dedup.lsh import band_keys
from booksmith.filters.dedup.minhash import MinHashParams
from booksmith.shards.files import (
    file_sha256,
    replace_atomically,
    tmp_name,
    write_json_atomically,
)

MANIFEST = "index.json"

_SEGMENT_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("exact", pa.uint64(), nullable=False),
        pa.field("sig", pa.binary(448), nullable=False),  # replaced per num_perm in _schema
    ]
)


def _schema(num_perm: int) -> pa.Schema:
    return _SEGMENT_SCHEMA.set(2, pa.field("sig", pa.binary(4 * num_perm), nullable=False))


class FileIndex:
    """A MinHash index in a local directory (see the module docstring)."""

    def __init__(self, path: Path, params: MinHashParams | None = None) -> None:
        self.path = Path(path)
        self.params = params or MinHashParams()
        self._loaded = False
        self._manifest = self._read_manifest()

    # -- manifest

    def _read_manifest(self) -> dict[str, Any]:
        path = self.path
        if path.exists() and not path.is_dir():
            raise DedupIndexError(f"{path}: is a file, not a booksmith MinHash index directory")
        manifest_path = path / MANIFEST
        if not manifest_path.exists():
            if path.is_dir() and any(p.name != ".lock" for p in path.iterdir()):
                raise DedupIndexError(
                    f"{path}: has files but no {MANIFEST}: not a booksmith MinHash index, or its "
                    "manifest was lost; refusing to start a new index over it"
                )
            return self._empty_manifest()
        try:
            data = json.loads(manifest_path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise DedupIndexError(f"{manifest_path}: corrupt index manifest ({e})") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise DedupIndexError(
                f"{manifest_path}: not a booksmith MinHash index (format != {FORMAT})"
            )
        if not isinstance(data.get("version"), int) or data["version"] > VERSION:
            raise DedupIndexError(
                f"{manifest_path}: index version {data.get('version')!r}; this booksmith reads "
                f"version {VERSION}: upgrade booksmith"
            )
        expected = index_params(self.params)
        if data.get("params") != expected:
            raise DedupIndexError(
                f"{manifest_path}: built with parameters {data.get('params')}, but this run uses "
                f"{expected}; signatures are not comparable (use another index path)"
            )
        segments = data.get("segments")
        if not isinstance(segments, list) or not all(
            isinstance(s, dict) and {"run_id", "file", "rows"} <= s.keys() for s in segments
        ):
            raise DedupIndexError(f"{manifest_path}: corrupt index manifest (bad 'segments')")
        flags = data.get("taken_down", {})
        if not isinstance(flags, dict) or not all(isinstance(v, str) for v in flags.values()):
            raise DedupIndexError(
                f"{manifest_path}: corrupt index manifest ('taken_down' must map document ids "
                "to run ids); restore it, or remove the key to drop the flags"
            )
        return data

    def _empty_manifest(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": VERSION,
            "params": index_params(self.params),
            "generation": 0,
            "entries": 0,
            "segments": [],
        }

    def _write_manifest(self, data: dict[str, Any], old: dict[str, Any]) -> None:
        kept = {s["run_id"] for s in data["segments"]}
        assert all(s["run_id"] in kept or s.get("_removing") for s in old["segments"]), (
            "an index write must keep every run it does not replace or remove"
        )
        write_json_atomically(self.path / MANIFEST, data, indent=1)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[dict[str, Any]]:
        """Exclusive writer lock; yields the manifest as it is now on disk."""
        self.path.mkdir(parents=True, exist_ok=True)
        with open(self.path / ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                manifest = self._read_manifest()
                if not (self.path / MANIFEST).exists():
                    # A new index: its (empty) manifest first, so a write killed before its own
                    # manifest leaves an index whose unlisted files the next write removes, not
                    # a directory of files without index.json that every later run refuses.
                    write_json_atomically(self.path / MANIFEST, manifest, indent=1)
                for seg in manifest["segments"]:
                    if not (self.path / seg["file"]).is_file():
                        raise DedupIndexError(
                            f"{self.path / seg['file']}: segment listed in {MANIFEST} is missing"
                        )
                yield manifest
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
        self._manifest = self._read_manifest()
        self._loaded = False

    # -- writes

    def add(self, run_id: str, ids: Sequence[str], sigs: np.ndarray, exact: np.ndarray) -> int:
        """Add (or replace) one run's entries; returns how many were added."""
        return self.add_entries(run_id, Entries.of(ids, sigs, exact))

    def add_entries(self, run_id: str, entries: Entries) -> int:
        """Add (or replace) one run's entries, written a block at a time; returns how many."""
        with self._locked() as manifest:
            generation = int(manifest["generation"]) + 1
            replaced = [s for s in manifest["segments"] if s["run_id"] == run_id]
            for s in replaced:
                s["_removing"] = True
            segments = [s for s in manifest["segments"] if s["run_id"] != run_id]
            segments.append(self._write_segment(generation, run_id, self._batches(entries)))
            new = {
                **manifest,
                "generation": generation,
                "segments": segments,
                "entries": sum(int(s["rows"]) for s in segments),
            }
            if flags := manifest.get("taken_down"):  # a replaced run keeps its entries' flags
                mine = {i for i, r in flags.items() if r == run_id}
                held = {str(i) for ids, _, _ in entries.blocks() for i in ids if str(i) in mine}
                new["taken_down"] = {i: r for i, r in flags.items() if r != run_id or i in held}
            self._write_manifest(new, manifest)
            # Replaced segments, and any left by a write that crashed before its manifest.
            listed = {s["file"] for s in segments}
            for path in (self.path / "segments").iterdir():
                if f"segments/{path.name}" not in listed:
                    path.unlink(missing_ok=True)
            self._drop_stale_lookups(segments)
        return int(segments[-1]["rows"])

    def _batches(self, entries: Entries) -> Iterator[pa.RecordBatch]:
        schema = _schema(self.params.num_perm)
        for ids, sigs, exact in entries.blocks():
            if len(ids) != sigs.shape[0] or len(ids) != exact.shape[0]:
                raise ValueError("ids, signatures and exact keys differ in length")
            if sigs.shape[1:] != (self.params.num_perm,):
                raise ValueError(f"signatures must have {self.params.num_perm} values")
            yield pa.record_batch(
                [
                    pa.array([str(i) for i in ids], pa.string()),
                    pa.array(np.asarray(exact, dtype=np.uint64)),
                    pa.FixedSizeBinaryArray.from_buffers(
                        pa.binary(4 * self.params.num_perm),
                        len(ids),
                        [None, pa.py_buffer(np.ascontiguousarray(sigs, dtype="<u4"))],
                    ),
                ],
                schema=schema,
            )

    def _write_segment(
        self, generation: int, run_id: str, batches: Iterable[pa.RecordBatch]
    ) -> dict[str, Any]:
        """One run's entries as a new segment file and its lookup tables; its manifest entry."""
        safe = re.sub(r"[^A-Za-z0-9._-]", "_", run_id)[:80]
        rel = f"segments/{generation:08d}-{safe}.parquet"
        target = self.path / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp, rows = tmp_name(target), 0
        try:
            # Signatures are random bytes: compressing them costs time and saves nothing.
            with pq.ParquetWriter(
                tmp,
                _schema(self.params.num_perm),
                compression={"id": "zstd", "exact": "none", "sig": "none"},
                use_dictionary=False,
            ) as writer:
                for batch in batches:
                    writer.write_batch(batch)
                    rows += batch.num_rows
            replace_atomically(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
        sha = file_sha256(target)
        build(target, self._lookup_dir({"file": rel}), self.params, sha)
        return {
            "run_id": run_id,
            "file": rel,
            "rows": rows,
            "bytes": target.stat().st_size,
            "sha256": sha,
        }

    def remove_run(self, run_id: str) -> int:
        """Remove one run's entries, except those of taken-down documents (they keep blocking
        the text: a retired version's takedown still holds); returns how many were removed."""
        if not (self.path / MANIFEST).exists():
            return 0
        with self._locked() as manifest:
            gone = [s for s in manifest["segments"] if s["run_id"] == run_id]
            flags = manifest.get("taken_down", {})
            held = {i for i, r in flags.items() if r == run_id}
            rows = sum(int(s["rows"]) for s in gone)
            if rows == len(held):
                return 0  # nothing, or only taken-down entries: nothing to remove
            for s in gone:
                s["_removing"] = True
            generation = int(manifest["generation"]) + 1
            segments = [s for s in manifest["segments"] if s["run_id"] != run_id]
            if held:
                kept = self._taken_down_rows(gone, held)
                segments.append(self._write_segment(generation, run_id, kept.to_batches()))
            new = {
                **manifest,
                "generation": generation,
                "segments": segments,
                "entries": sum(int(s["rows"]) for s in segments),
            }
            self._write_manifest(new, manifest)
            for s in gone:
                (self.path / s["file"]).unlink(missing_ok=True)
            self._drop_stale_lookups(segments)
            return rows - len(held)

    def _taken_down_rows(self, segments: list[dict[str, Any]], ids: set[str]) -> pa.Table:
        wanted = pa.array(sorted(ids), pa.string())
        tables = [pq.read_table(self.path / s["file"]) for s in segments]
        table = pa.concat_tables(tables)
        return table.filter(pc.is_in(table.column("id"), value_set=wanted))

    def flag_taken_down(self, ids: Iterable[str]) -> int:
        """Flag the entries of these document ids as taken down; the entries themselves stay
        (signatures and hashes, no text), so a later run still finds the text as a duplicate.
        Returns how many entries were flagged (ids the index does not hold are skipped)."""
        wanted = pa.array(sorted({str(i) for i in ids}), pa.string())
        if not len(wanted) or not (self.path / MANIFEST).exists():
            return 0
        with self._locked() as manifest:
            flags = dict(manifest.get("taken_down", {}))
            found = 0
            for seg in manifest["segments"]:
                column = pq.read_table(self.path / seg["file"], columns=["id"]).column("id")
                hits = column.filter(pc.is_in(column, value_set=wanted)).to_pylist()
                flags.update(dict.fromkeys(hits, seg["run_id"]))
                found += len(hits)
            if found:
                self._write_manifest({**manifest, "taken_down": flags}, manifest)
        return found

    def taken_down(self) -> dict[str, str]:
        """The flagged entries: document id -> the run whose entry it is."""
        return dict(self._manifest.get("taken_down", {}))

    def _drop_stale_lookups(self, segments: list[dict[str, Any]]) -> None:
        listed = {self._lookup_dir(s).name for s in segments}
        lookup = self.path / "lookup"
        for path in lookup.iterdir() if lookup.is_dir() else []:
            if path.name not in listed:
                shutil.rmtree(path, ignore_errors=True)

    # -- reads

    def runs(self) -> dict[str, int]:
        return {s["run_id"]: int(s["rows"]) for s in self._manifest["segments"]}

    def __len__(self) -> int:
        return int(self._manifest.get("entries", 0))

    def verify(self) -> None:
        """Check every segment's sha256 against the manifest (slow: reads every byte)."""
        for seg in self._manifest["segments"]:
            path = self.path / seg["file"]
            if not path.is_file() or file_sha256(path) != seg.get("sha256"):
                raise DedupIndexError(f"{path}: segment does not match its sha256 in {MANIFEST}")

    def _lookup_dir(self, seg: dict[str, Any]) -> Path:
        return self.path / "lookup" / Path(seg["file"]).stem

    def _load(self) -> None:
        """Open every segment's memory-mapped lookup tables (lookup.py), building those that
        are missing or stale (an index written before them)."""
        if self._loaded:
            return
        num_perm = self.params.num_perm
        self._segments: list[tuple[str, SegmentLookup]] = []
        for seg in self._manifest["segments"]:
            path, root = self.path / seg["file"], self._lookup_dir(seg)
            rows = int(seg["rows"])
            # The tables are derived from the segment: a segment that is gone or changed size
            # is an error here (a same-size corruption is what `verify` reads every byte for).
            try:
                size = path.stat().st_size
            except OSError as e:
                raise DedupIndexError(f"{path}: unreadable index segment ({e})") from None
            if "bytes" in seg and size != int(seg["bytes"]):
                raise DedupIndexError(
                    f"{path}: unreadable index segment ({size} bytes, {MANIFEST} says "
                    f"{seg['bytes']}): restore it, or remove the index to rebuild it"
                )
            if not SegmentLookup.current(root, rows, seg.get("sha256")):
                try:
                    meta = pq.read_metadata(path)
                    schema = meta.schema.to_arrow_schema()
                except (OSError, pa.ArrowException) as e:
                    raise DedupIndexError(f"{path}: unreadable index segment ({e})") from None
                if not schema.equals(_schema(num_perm)) or meta.num_rows != rows:
                    raise DedupIndexError(
                        f"{path}: index segment does not match {MANIFEST} (schema or row count)"
                    )
                try:
                    build(path, root, self.params, seg.get("sha256") or "")
                except (OSError, pa.ArrowException) as e:
                    raise DedupIndexError(f"{path}: unreadable index segment ({e})") from None
            self._segments.append((seg["run_id"], SegmentLookup(root, rows)))
        self._loaded = True

    def lookup_exact(self, keys: np.ndarray) -> list[Match | None]:
        """The earliest indexed document with each exact key (segments in the order written)."""
        self._load()
        keys = np.asarray(keys, dtype=np.uint64)
        out: list[Match | None] = [None] * len(keys)
        for run_id, seg in self._segments:
            rows = seg.lookup_exact(keys)
            for i in np.flatnonzero(rows >= 0).tolist():
                if out[i] is None:
                    out[i] = Match(id=seg.id(int(rows[i])), run_id=run_id, jaccard=1.0)
            seg.release()
        return out

    def lookup_near(self, sigs: np.ndarray, threshold: float) -> list[Match | None]:
        """For each signature, the most similar entry with estimated Jaccard >= threshold (the
        earliest written among equals). At most `_MAX_BUCKET` entries per (query, band,
        segment) are checked: any one near-duplicate is enough."""
        self._load()
        n = sigs.shape[0]
        out: list[Match | None] = [None] * n
        if n == 0 or not self._segments:
            return out
        keys = band_keys(sigs, self.params.bands, self.params.rows)
        best = np.full(n, -1.0)
        for run_id, seg in self._segments:
            q, rows, est = seg.candidates(keys, _MAX_BUCKET, sigs, threshold)
            if q.size == 0:
                seg.release()
                continue
            # Best row per query within this segment (highest Jaccard, then earliest row).
            order = np.lexsort((rows, -est, q))
            q, rows, est = q[order], rows[order], est[order]
            first = np.concatenate([[True], q[1:] != q[:-1]]).astype(bool)
            for i, r, j in zip(q[first].tolist(), rows[first].tolist(), est[first].tolist(),
                               strict=True):  # fmt: skip
                if j > best[i]:  # strictly better: an earlier segment wins ties
                    best[i] = j
                    out[i] = Match(id=seg.id(r), run_id=run_id, jaccard=j)
            seg.release()
        return out

    def close(self) -> None:
        self._loaded = False
