"""Which source passages earlier runs planned: `<out>/_state/sources/planned/<run_id>.npy`,
one sorted array of 8-byte passage keys per published run, written after its manifest (a run
killed before that plans the same passages when resumed, as its run key promises; a rerun of
a published run writes it from the version's plan.parquet if the kill came before it). A later
run skips these passages unless `grounding.repeat: any`. 8 bytes a passage: a million planned
passages weigh 8 MB.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from booksmith.shards.files import write_bytes_atomically
from booksmith.shards.version_dir import state_dir

PLANNED_DIR = "sources/planned"


def passage_key(source: str, record_id: str, start: int, end: int) -> int:
    """A passage's identity across runs: its source's name, its record's id and its character
    span (what a version's plan.parquet records, so the state can be rebuilt from versions; a
    record cut with another window gives other passages)."""
    h = hashlib.blake2b(digest_size=8)
    for part in (source, record_id, f"{start}:{end}"):
        h.update(part.encode("utf-8") + b"\0")
    return int.from_bytes(h.digest(), "big")


def version_keys(version: Path) -> list[int]:
    """The passage keys a version's plan holds (none for a version without sources)."""
    plan = version / "plan.parquet"
    columns = ["source_name", "source_id", "source_start", "source_end"]
    if not plan.is_file() or "source_id" not in pq.read_schema(plan).names:
        return []
    keys = []
    for batch in pq.ParquetFile(plan).iter_batches(columns=columns):
        for name, rid, start, end in zip(*(batch.column(c).to_pylist() for c in columns),
                                         strict=True):  # fmt: skip
            if rid is not None:
                keys.append(passage_key(name, rid, start, end))
    return keys


def recorded(out: Path, run_id: str) -> bool:
    return (state_dir(out) / PLANNED_DIR / f"{run_id}.npy").is_file()


def planned_passages(out: Path) -> np.ndarray:
    """Every passage key earlier runs planned, sorted (for np.searchsorted)."""
    folder = state_dir(out) / PLANNED_DIR
    arrays = []
    for path in sorted(folder.glob("*.npy")) if folder.is_dir() else []:
        try:
            arrays.append(np.load(path, allow_pickle=False).astype(np.uint64, copy=False))
        except (OSError, ValueError) as e:
            raise ValueError(
                f"{path}: damaged record of planned source passages ({e}); delete it to let "
                "that run's passages be planned again"
            ) from None
    if not arrays:
        return np.empty(0, dtype=np.uint64)
    return np.unique(np.concatenate(arrays))


def record_planned(out: Path, run_id: str, keys: Iterable[int]) -> Path | None:
    """Record a published run's planned passages; None when it planned none."""
    array = np.unique(np.fromiter(keys, dtype=np.uint64))
    if not array.size:
        return None
    path = state_dir(out) / PLANNED_DIR / f"{run_id}.npy"
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    write_bytes_atomically(path, buffer.getvalue())
    return path


def contains(sorted_keys: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """Which of `keys` are in `sorted_keys`."""
    if not sorted_keys.size:
        return np.zeros(len(keys), dtype=bool)
    at = np.minimum(np.searchsorted(sorted_keys, keys), sorted_keys.size - 1)
    return np.asarray(sorted_keys[at] == keys)


TAKEN_DOWN = "sources/taken_down.jsonl"  # one line per source record taken down


def record_taken_down(out: Path, records: Iterable[tuple[str | None, str]]) -> None:
    """Remember source records taken down ((source name or None for any source, record id)),
    so no later run plans from them again, whatever the source file still holds."""
    known = taken_down_records(out)
    new = [r for r in dict.fromkeys(records) if r not in known]
    if not new:
        return
    path = state_dir(out) / TAKEN_DOWN
    lines = path.read_bytes() if path.is_file() else b""
    lines += b"".join(
        json.dumps({"source": s, "id": i}, ensure_ascii=False).encode() + b"\n" for s, i in new
    )
    write_bytes_atomically(path, lines)


def taken_down_records(out: Path) -> set[tuple[str | None, str]]:
    """The source records takedowns removed: (source name or None, record id)."""
    path = state_dir(out) / TAKEN_DOWN
    if not path.is_file():
        return set()
    found = set()
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        try:
            entry = json.loads(line)
            found.add((entry["source"], str(entry["id"])))
        except (ValueError, KeyError, TypeError):
            raise ValueError(
                f'{path}:{n}: damaged takedown record (want {{"source": ..., "id": ...}}); '
                "fix the line, or run the takedown again to write it"
            ) from None
    return found


def is_taken_down(taken: set[tuple[str | None, str]], source: str, record_id: str) -> bool:
    return (source, record_id) in taken or (None, record_id) in taken
