"""A durable response cache and failures table (SQLite, one file under `<out>/_state/`).

Keyed by the request id, which is the hash of (model, messages, sampling, sample index): a run
that is killed and started again with the same plan finds every finished generation here and
never requests it again. Each result is committed as it arrives (WAL mode, so a reader or a
crash never sees half a row).
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from booksmith.schemas import GenerationResult

TAKEN_DOWN = "taken_down"  # the failure reason of a request whose text was taken down

_SCHEMA = """
CREATE TABLE IF NOT EXISTS responses (
    request_id TEXT PRIMARY KEY,
    result TEXT NOT NULL,
    created_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS failures (
    request_id TEXT PRIMARY KEY,
    run_id TEXT NOT NULL,
    reason TEXT NOT NULL,
    permanent INTEGER NOT NULL,
    attempts INTEGER NOT NULL,
    result TEXT NOT NULL,
    created_at TEXT NOT NULL
);
"""


class ResponseCache:
    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # One connection shared under a lock: the client calls it from one event loop, but
        # Prefect may run the task in a worker thread.
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")  # durable across a process crash
        self._db.executescript(_SCHEMA)

    def get(self, request_id: str) -> GenerationResult | None:
        with self._lock:
            row = self._db.execute(
                "SELECT result FROM responses WHERE request_id = ?", (request_id,)
            ).fetchone()
        return GenerationResult.model_validate_json(row[0]) if row else None

    def put(self, result: GenerationResult) -> None:
        self.put_many([result])

    def put_many(self, results: Sequence[GenerationResult]) -> None:
        """Store answers in one transaction: durable together once this returns (the live
        client's writer commits its answers in groups, generation/cache_writer.py)."""
        assert all(r.ok for r in results), "failures go to record_failure"
        rows = [(r.request_id, r.model_dump_json(), r.created_at.isoformat()) for r in results]
        with self._lock:
            self._db.execute("BEGIN")
            try:
                self._db.executemany("INSERT OR REPLACE INTO responses VALUES (?, ?, ?)", rows)
                self._db.executemany(
                    "DELETE FROM failures WHERE request_id = ?", [(r[0],) for r in rows]
                )
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def record_failure(self, result: GenerationResult, *, run_id: str, permanent: bool) -> None:
        assert result.error is not None
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO failures VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    result.request_id,
                    run_id,
                    result.error,
                    int(permanent),
                    result.attempts,
                    result.model_dump_json(),
                    result.created_at.isoformat(),
                ),
            )

    def permanent_failure(self, request_id: str) -> GenerationResult | None:
        """A failure that retrying will not fix (400, content filter), from an earlier run."""
        with self._lock:
            row = self._db.execute(
                "SELECT result FROM failures WHERE request_id = ? AND permanent = 1",
                (request_id,),
            ).fetchone()
        return GenerationResult.model_validate_json(row[0]) if row else None

    def take_down(self, request_ids: Iterable[str], run_id: str = "takedown") -> int:
        """Forget the answers of these requests and tombstone them: a permanent failure
        "taken_down" that no later run asks again (not even with `retry_failed`), so a
        taken-down text is never regenerated or served from here. Returns answers removed."""
        ids = sorted(set(request_ids))
        removed = 0
        with self._lock:
            # SQLite keeps a deleted row's bytes in free pages and in the WAL: zero them
            self._db.execute("PRAGMA secure_delete=ON")
            for rid in ids:
                removed += self._db.execute(
                    "DELETE FROM responses WHERE request_id = ?", (rid,)
                ).rowcount
                tomb = GenerationResult(request_id=rid, error=TAKEN_DOWN, attempts=0)
                self._db.execute(
                    "INSERT OR REPLACE INTO failures VALUES (?, ?, ?, 1, 0, ?, ?)",
                    (rid, run_id, TAKEN_DOWN, tomb.model_dump_json(), tomb.created_at.isoformat()),
                )
            self._scrub()
        return removed

    def _scrub(self) -> None:
        """No copy of deleted rows left on disk: the WAL folded in and truncated, the file
        rebuilt without its free pages (VACUUM rewrites it: about a second per GB)."""
        self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        self._db.execute("VACUUM")
        self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def taken_down(self, request_id: str) -> GenerationResult | None:
        with self._lock:
            row = self._db.execute(
                "SELECT result FROM failures WHERE request_id = ? AND reason = ?",
                (request_id, TAKEN_DOWN),
            ).fetchone()
        return GenerationResult.model_validate_json(row[0]) if row else None

    def failures(self) -> Iterator[tuple[str, str, str, bool, int]]:
        """(request_id, run_id, reason, permanent, attempts) for every recorded failure."""
        with self._lock:
            rows = self._db.execute(
                "SELECT request_id, run_id, reason, permanent, attempts FROM failures"
            ).fetchall()
        for rid, run_id, reason, permanent, attempts in rows:
            yield rid, run_id, reason, bool(permanent), attempts

    def __len__(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT count(*) FROM responses").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            self._db.close()
