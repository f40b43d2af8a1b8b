"""Generation through the OpenAI Batch API: half the price of live calls, a day's latency.

Same contract as `GenerationClient.run`: every request ends as a result (fresh or cached), a
recorded failure, or skipped by the budget; results go into the same `ResponseCache`. The work
is written as JSONL files (see `generation.batch_files`), uploaded, submitted as one batch per
file, polled, and its output joined back by custom_id.

Every step is recorded in `<state_dir>/batches.sqlite` before the next begins, so a process
killed at any point resumes where it was: a file already uploaded is not uploaded again, a
batch already created is polled rather than created again (one created but not yet recorded is
found by its input file id), and finished output is read again from the server if the process
died while joining it.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast

import openai
from openai.types import Batch

from booksmith.generation.batch_files import (
    BATCH_URL,
    MAX_BYTES_PER_FILE,
    MAX_REQUESTS_PER_FILE,
    BatchFileError,
    LineOutcome,
    encode_line,
    read_outcomes,
    write_batch_files,
)
from booksmith.generation.cache import ResponseCache
from booksmith.generation.client import Endpoint
from booksmith.generation.ledger import GenerationReport, Ledger
from booksmith.schemas import GenerationRequest, GenerationResult
from booksmith.schemas.config import Budget, Price

log = logging.getLogger(__name__)

# The server's terminal batch statuses; "done" is ours: the outcomes are in the cache.
TERMINAL = frozenset({"completed", "failed", "expired", "cancelled"})

_SCHEMA = """
CREATE TABLE IF NOT EXISTS batches (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    path TEXT NOT NULL,            -- the input file, relative to the state directory
    run_id TEXT NOT NULL,
    n_requests INTEGER NOT NULL,
    n_bytes INTEGER NOT NULL,
    state TEXT NOT NULL,           -- written -> uploaded -> submitted -> done
    input_file_id TEXT,
    batch_id TEXT,
    status TEXT,                   -- the server's batch status, as last seen
    output_file_id TEXT,
    error_file_id TEXT,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS batch_requests (
    seq INTEGER NOT NULL,
    custom_id TEXT NOT NULL,
    attempt INTEGER NOT NULL,      -- 1 for the first submission of the request in its run
    PRIMARY KEY (seq, custom_id)
);
CREATE INDEX IF NOT EXISTS batch_requests_by_id ON batch_requests (custom_id);
"""


@dataclass
class BatchRecord:
    """One input file and the batch made from it, as persisted."""

    seq: int
    path: str
    run_id: str
    n_requests: int
    n_bytes: int
    state: str
    input_file_id: str | None
    batch_id: str | None
    status: str | None
    output_file_id: str | None
    error_file_id: str | None
    created_at: float
    updated_at: float


class BatchState:
    """The batches table under `state_dir` (SQLite, autocommit: each step is durable)."""

    def __init__(self, state_dir: Path) -> None:
        self.dir = Path(state_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.dir / "batches.sqlite", isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        self._db.close()

    def _rows(self, where: str = "", args: Iterable[Any] = ()) -> list[BatchRecord]:
        cols = ", ".join(BatchRecord.__dataclass_fields__)
        sql = f"SELECT {cols} FROM batches {where} ORDER BY seq"
        return [BatchRecord(*row) for row in self._db.execute(sql, tuple(args))]

    def all(self) -> list[BatchRecord]:
        return self._rows()

    def open(self) -> list[BatchRecord]:
        return self._rows("WHERE state != 'done'")

    def add(self, path: Path, run_id: str, n_bytes: int, attempts: dict[str, int]) -> BatchRecord:
        now = time.time()
        rel = str(path.relative_to(self.dir))
        self._db.execute("BEGIN")
        cur = self._db.execute(
            "INSERT INTO batches (path, run_id, n_requests, n_bytes, state, created_at,"
            " updated_at) VALUES (?, ?, ?, ?, 'written', ?, ?)",
            (rel, run_id, len(attempts), n_bytes, now, now),
        )
        seq = cur.lastrowid
        self._db.executemany(
            "INSERT INTO batch_requests VALUES (?, ?, ?)",
            [(seq, cid, n) for cid, n in attempts.items()],
        )
        self._db.execute("COMMIT")
        return self._rows("WHERE seq = ?", (seq,))[0]

    def update(self, record: BatchRecord, **fields: Any) -> None:
        fields["updated_at"] = time.time()
        sets = ", ".join(f"{k} = ?" for k in fields)
        self._db.execute(f"UPDATE batches SET {sets} WHERE seq = ?", (*fields.values(), record.seq))
        for k, v in fields.items():
            setattr(record, k, v)

    def requests(self, record: BatchRecord) -> dict[str, int]:
        """custom_id -> attempt number, for the requests in one batch."""
        rows = self._db.execute(
            "SELECT custom_id, attempt FROM batch_requests WHERE seq = ?", (record.seq,)
        )
        return dict(rows.fetchall())

    def attempts(self, run_id: str) -> dict[str, int]:
        """Submissions so far per request in this run (so retries stop across restarts)."""
        rows = self._db.execute(
            "SELECT r.custom_id, max(r.attempt) FROM batch_requests r"
            " JOIN batches b ON b.seq = r.seq WHERE b.run_id = ? GROUP BY r.custom_id",
            (run_id,),
        )
        return dict(rows.fetchall())


def list_batches(state_dir: Path) -> list[BatchRecord]:
    """Every batch recorded under `state_dir`, oldest first (for a status command)."""
    if not (Path(state_dir) / "batches.sqlite").exists():
        return []
    state = BatchState(state_dir)
    try:
        return state.all()
    finally:
        state.close()


def import_results(
    path: Path, cache: ResponseCache, *, backend: str, run_id: str = ""
) -> Counter[str]:
    """Join an output or error file made elsewhere into the cache: e.g. vLLM's
    `python -m vllm.entrypoints.openai.run_batch -i <our input file> -o <path>` on a
    self-hosted GPU. Completions are stored and permanent failures recorded; transient ones
    are left for the next run to retry. Returns counts by outcome."""
    counts: Counter[str] = Counter()
    for outcome in read_outcomes(path, backend=backend):
        result = outcome.result
        if result.ok:
            cache.put(result)
            counts["completed"] += 1
        else:
            if outcome.permanent:
                cache.record_failure(result, run_id=run_id, permanent=True)
            counts[result.error or "unknown"] += 1
    return counts


class BatchGenerationClient:
    """`GenerationClient`'s contract over the Batch API (OpenAI, or any server with the
    /v1/files and /v1/batches endpoints)."""

    def __init__(
        self,
        endpoint: Endpoint,
        *,
        state_dir: Path,
        cache: ResponseCache | None = None,
        run_id: str = "",
        prices: dict[str, Price] | None = None,
        budget: Budget | None = None,
        retry_failed: bool = False,
        on_result: Callable[[GenerationResult, GenerationReport], None] | None = None,
        token_counter: Callable[[str], int] | None = None,
        poll_interval_s: float = 30.0,
        completion_window: str = "24h",
        max_requests_per_file: int = MAX_REQUESTS_PER_FILE,
        max_bytes_per_file: int = MAX_BYTES_PER_FILE,
        keep_files: bool = True,
    ) -> None:
        # The same ledger as the live client's: the two backends account and budget alike.
        self.ledger = Ledger(
            price=(prices or {}).get(endpoint.model),
            budget=budget,
            on_result=on_result,
            token_counter=token_counter,
        )
        self.retry_failed = retry_failed
        self.endpoint = endpoint
        self.cache = cache
        self.run_id = run_id
        self.state_dir = Path(state_dir)
        self.poll_interval_s = poll_interval_s
        self.completion_window = completion_window
        self.max_requests_per_file = max_requests_per_file
        self.max_bytes_per_file = max_bytes_per_file
        self.keep_files = keep_files  # False: delete a batch's local JSONL once it is joined

    @property
    def report(self) -> GenerationReport:
        return self.ledger.report

    # -- the stage ------------------------------------------------------------------------------

    async def run(self, requests: Sequence[GenerationRequest]) -> GenerationReport:
        """Generate every request (or find it in the cache) through batches; returns the report
        with results in the order their batches finished."""
        report = self.ledger.start(planned=len(requests))
        started = time.perf_counter()
        self._pending: dict[str, GenerationRequest] = {}
        self._copies: Counter[str] = Counter()  # repeats of an id: accounted as cache hits
        for req in requests:
            if self.ledger.from_cache(req, self.cache, self.retry_failed):
                continue
            if req.id in self._pending:
                self._copies[req.id] += 1
            else:
                self._pending[req.id] = req
        if not self._pending:
            report.elapsed_s = time.perf_counter() - started
            return report

        self._state = BatchState(self.state_dir)
        self._reserved: dict[str, float] = {}
        api = openai.AsyncOpenAI(
            base_url=self.endpoint.base_url,
            api_key=self.endpoint.api_key,
            max_retries=self.endpoint.max_retries,  # uploads and polls: the SDK's backoff
            timeout=self.endpoint.timeout_s,
        )
        try:
            self._attempts = self._state.attempts(self.run_id)
            adopted = self._adopt()
            submit = self._budgeted(in_flight={cid for r in adopted for cid in self._ids(r)})
            await self._loop(api, adopted + self._write(submit))
        finally:
            await api.close()
            self._state.close()
        report.elapsed_s = time.perf_counter() - started
        return report

    def _ids(self, record: BatchRecord) -> list[str]:
        return [cid for cid in self._state.requests(record) if cid in self._pending]

    def _adopt(self) -> list[BatchRecord]:
        """Open batches from an earlier, interrupted process that hold requests of this run."""
        adopted = [r for r in self._state.open() if self._ids(r)]
        for record in adopted:
            log.info("batch: resuming %s (%s)", record.batch_id or record.path, record.state)
            for cid, attempt in self._state.requests(record).items():
                self._attempts[cid] = max(self._attempts.get(cid, 0), attempt)
        return adopted

    def _budgeted(self, in_flight: set[str]) -> list[GenerationRequest]:
        """Reserve each request's estimate; skip what the budget cannot cover, in plan order,
        as the live client does. Requests already in a submitted batch are paid for: reserved
        without a check. A request no batch server would accept fails here, permanently."""
        submit = []
        for cid, req in list(self._pending.items()):
            if cid in in_flight:
                self._reserved[cid] = self.ledger.reserve_paid(req)
                continue
            try:  # the live client would get a 400 for it; one bad request fails alone
                encode_line(req, max_bytes=self.max_bytes_per_file)
            except BatchFileError as exc:
                log.warning("batch: %s", exc)
                failed = GenerationResult(request_id=cid, error="batch:invalid_request")
                self._fail(failed, 0, 0.0, permanent=True)
                continue
            estimate = self.ledger.reserve(req, copies=self._copies[cid])
            if estimate is None:  # over the budget: skipped, with its repeats
                continue
            self._reserved[cid] = estimate
            submit.append(req)
        return submit

    def _write(self, requests: list[GenerationRequest]) -> list[BatchRecord]:
        """Write the input files and record them (state 'written') before any upload."""
        if not requests:
            return []
        prefix = f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}"
        files = write_batch_files(
            requests,
            self.state_dir / "files",
            prefix=prefix,
            max_requests=self.max_requests_per_file,
            max_bytes=self.max_bytes_per_file,
        )
        records = []
        for f in files:
            attempts = {cid: self._attempts.get(cid, 0) + 1 for cid in f.custom_ids}
            self._attempts.update(attempts)
            records.append(self._state.add(f.path, self.run_id, f.n_bytes, attempts))
            self.report.requests += len(attempts)
            self.report.retries += sum(n > 1 for n in attempts.values())
        return records

    async def _loop(self, api: openai.AsyncOpenAI, records: list[BatchRecord]) -> None:
        """Submit, poll and join until every batch is done; failed lines go in new batches."""
        while records:
            retry: list[GenerationRequest] = []
            for record in records:
                await self._submit(api, record)
            for record in records:
                if await self._poll(api, record):
                    retry += await self._finish(api, record)
            records = [r for r in records if r.state != "done"] + self._write(retry)
            if records and not retry:
                await asyncio.sleep(self.poll_interval_s)

    # -- one batch ------------------------------------------------------------------------------

    async def _submit(self, api: openai.AsyncOpenAI, record: BatchRecord) -> None:
        """Upload and create, recording each id as soon as the server gives it."""
        if record.state == "written":
            uploaded = await api.files.create(file=self.state_dir / record.path, purpose="batch")
            self._state.update(record, state="uploaded", input_file_id=uploaded.id)
        if record.state == "uploaded":
            assert record.input_file_id is not None
            batch = await self._find_batch(api, record.input_file_id, record.updated_at)
            if batch is not None:
                log.info("batch: found %s, created before the last process died", batch.id)
            else:
                batch = await api.batches.create(
                    input_file_id=record.input_file_id,
                    endpoint=BATCH_URL,
                    completion_window=cast(Literal["24h"], self.completion_window),
                    metadata={"booksmith_file": Path(record.path).name, "run_id": self.run_id},
                )
                log.info("batch: %s created for %d requests", batch.id, record.n_requests)
            # The status is left for _poll to record, with the output files that go with it.
            self._state.update(record, state="submitted", batch_id=batch.id)

    async def _find_batch(
        self, api: openai.AsyncOpenAI, input_file_id: str, since: float
    ) -> Batch | None:
        """A batch created for this input file by a process that died before recording it."""
        async for batch in api.batches.list(limit=100):  # newest first
            if batch.input_file_id == input_file_id:
                return batch
            if batch.created_at < since - 600:
                break
        return None

    async def _poll(self, api: openai.AsyncOpenAI, record: BatchRecord) -> bool:
        """Refresh a submitted batch's status; True once it has ended."""
        if record.state != "submitted":
            return False
        assert record.batch_id is not None
        try:
            batch = await api.batches.retrieve(record.batch_id)
        except (openai.APIConnectionError, openai.InternalServerError) as exc:
            # A day-long wait should survive a blip the SDK's retries did not: poll again later.
            log.warning("batch: polling %s failed (%s); will retry", record.batch_id, exc)
            return False
        seen = (batch.status, batch.output_file_id, batch.error_file_id)
        if seen != (record.status, record.output_file_id, record.error_file_id):
            counts = batch.request_counts
            done = f" {counts.completed + counts.failed}/{counts.total}" if counts else ""
            log.info("batch: %s %s%s", batch.id, batch.status, done)
            self._state.update(
                record,
                status=batch.status,
                output_file_id=batch.output_file_id,
                error_file_id=batch.error_file_id,
            )
        if batch.status == "failed" and batch.errors and batch.errors.data:
            for err in batch.errors.data[:5]:
                log.warning("batch: %s failed: line %s: %s", batch.id, err.line, err.message)
        return batch.status in TERMINAL

    async def _download(self, api: openai.AsyncOpenAI, file_id: str, path: Path) -> Path:
        tmp = path.with_name(f".{path.name}.tmp")
        async with api.files.with_streaming_response.content(file_id) as response:
            await response.stream_to_file(tmp)
        tmp.replace(path)
        return path

    async def _finish(
        self, api: openai.AsyncOpenAI, record: BatchRecord
    ) -> list[GenerationRequest]:
        """Join an ended batch's output into the cache; returns the requests to resubmit."""
        stem = (self.state_dir / record.path).with_suffix("")
        outcomes: dict[str, LineOutcome] = {}
        downloaded = []
        for file_id, suffix in (
            (record.error_file_id, "errors"),
            (record.output_file_id, "output"),  # second: a success wins over an error line
        ):
            if file_id:
                path = await self._download(api, file_id, stem.with_suffix(f".{suffix}.jsonl"))
                downloaded.append(path)
                for line in read_outcomes(path, backend=self.endpoint.backend):
                    outcomes[line.custom_id] = line
        latency = time.time() - record.created_at  # the batch's turnaround
        retry = []
        for cid, attempt in self._state.requests(record).items():
            outcome = outcomes.get(cid)
            if outcome is not None and outcome.result.ok:
                update = {"attempts": attempt, "latency_s": latency}
                result = outcome.result.model_copy(update=update)
                if self.cache is not None:  # even for a request of another run: it is paid for
                    self.cache.put(result)
                if cid in self._pending:
                    self._final(result)
            elif cid not in self._pending:
                continue
            elif outcome is not None and outcome.permanent:
                self._fail(outcome.result, attempt, latency, permanent=True)
            else:
                reason = outcome.result.error if outcome else f"batch:{record.status}"
                if attempt > self.endpoint.max_retries:
                    failed = GenerationResult(request_id=cid, error=f"retries_exhausted:{reason}")
                    self._fail(failed, attempt, latency, permanent=False)
                else:
                    self.report.retry_reasons[reason or "unknown"] += 1
                    retry.append(self._pending[cid])
        # Only now is the batch done: a process killed above reads the same output again.
        self._state.update(record, state="done")
        if not self.keep_files:
            for path in (stem.with_suffix(".jsonl"), *downloaded):
                path.unlink(missing_ok=True)
        return retry

    # -- accounting -----------------------------------------------------------------------------

    def _fail(
        self, result: GenerationResult, attempts: int, latency: float, *, permanent: bool
    ) -> None:
        update = {
            "attempts": attempts,
            "latency_s": latency,
            "backend": self.endpoint.backend,
            "model": self._pending[result.request_id].model,
        }
        result = result.model_copy(update=update)
        if self.cache is not None:
            self.cache.record_failure(result, run_id=self.run_id, permanent=permanent)
        self._final(result)

    def _final(self, result: GenerationResult) -> None:
        """Account a request's last outcome once (and its repeats in the plan as cache hits)."""
        cid = result.request_id
        self._pending.pop(cid)
        self.ledger.release(self._reserved.pop(cid, 0.0))
        self.ledger.account(result, cached=False)
        for _ in range(self._copies[cid]):
            self.ledger.account(result, cached=result.ok)
