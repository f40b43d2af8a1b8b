"""One chunk of a streaming run, from generation results to a spilled, checkpointed chunk.

`ChunkPipeline.process(chunk)` turns the chunk's generation results into documents, runs them
through ExactStage -> QualityStage -> JudgeStage (pipeline/judge_stage.py; off by default) ->
NearStage (pipeline/stages.py), and spills every document of the chunk, in plan order, to
`<work>/chunks/chunk-NNNNN.parquet`: rejected ones with their reason, near-dup candidates
with an empty reason and their row in the candidate store. Failed requests go straight to the
version's failures file. Then the chunk is released: nothing of it stays in memory but
counters.

The state that crosses chunks is `RunState`: the exact-dedup map (in ExactStage), the
candidate store (on disk), the stage counters, the generation totals and the plan positions.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from booksmith.filters.dedup import DedupIndex, DedupSettings
from booksmith.filters.dedup.candidates import CandidateStore
from booksmith.generation.documents import to_documents
from booksmith.generation.ledger import GenerationReport
from booksmith.generation.limits import RATE_POINTS, append_series
from booksmith.pipeline.checkpoint import Checkpoint
from booksmith.pipeline.first_ids import FirstIds
from booksmith.pipeline.judge_stage import JudgeStage
from booksmith.pipeline.stages import ExactStage, NearStage, QualityStage
from booksmith.schemas import GenerationRequest, GenerationResult, Rejected
from booksmith.schemas.arrow import to_table
from booksmith.schemas.crashpoints import crash_point
from booksmith.schemas.filter_settings import FilterSettings
from booksmith.shards.dataset import VersionWriter
from booksmith.shards.files import write_table_atomically

OUTCOMES_KEPT = 1_000  # the breaker's window across chunks is at most this long
CANDIDATE = ""  # the spilled reason of a document still in the run (near-dup undecided)
TOTALS = (
    "planned", "completed", "cached", "failed", "skipped_budget", "skipped_breaker", "requests",
    "retries", "rate_limited", "prompt_tokens", "completion_tokens", "cost_usd", "truncated",
    "empty", "elapsed_s",
)  # fmt: skip


def add_report(total: GenerationReport, part: GenerationReport) -> None:
    """Sum a chunk's generation accounting into the run's (its results are not kept)."""
    # the chunk's effective-rate series after the run's, at the generation time so far
    total.rate = append_series(total.rate, part.rate, total.elapsed_s, RATE_POINTS)
    total.limits.update(part.limits)
    for name in TOTALS:
        setattr(total, name, getattr(total, name) + getattr(part, name))
    total.failures.update(part.failures)
    total.retry_reasons.update(part.retry_reasons)
    total.budget_exhausted |= part.budget_exhausted
    # The breaker's window carries over to the next chunk: the chunk's report holds the window
    # as it ended (the history it started from included), so it replaces the run's.
    if part.outcomes:
        total.outcomes = list(part.outcomes)[-OUTCOMES_KEPT:]


@dataclass
class Chunk:
    number: int
    plan: list[GenerationRequest]


@dataclass
class ChunkStats:
    """What one chunk did, for progress lines and the benchmark."""

    number: int
    requests: int
    documents: int
    failures: int
    rejected: int
    candidates: int
    seconds: dict[str, float] = field(default_factory=dict)


class RunState:
    """Everything that crosses chunks, kept under the run's work directory `work`."""

    def __init__(
        self,
        work: Path,
        *,
        run_id: str,
        encoding: str,
        filters: FilterSettings,
        dedup: DedupSettings,
        index: DedupIndex | None,
        state: Path | None,
        workers: int | None = None,
    ) -> None:
        self.work, self.run_id, self.encoding = work, run_id, encoding
        (work / "chunks").mkdir(parents=True, exist_ok=True)
        self.store = CandidateStore(work / "candidates", dedup.params)
        # the exact map: keys in memory, each key's first id appended to exact.bin
        self.exact = ExactStage(FirstIds(work / "exact.bin"), index, enabled=dedup.exact)
        self.quality = QualityStage(filters, state, workers)
        self.judge = JudgeStage(filters.faithfulness.judge, run_id)
        self.near = NearStage(dedup, self.store, index)
        self.dedup = dedup
        self.generation = GenerationReport()
        self.exact_counts: Counter[str] = Counter({"input": 0, "kept": 0})
        self.near_counts: Counter[str] = Counter({"input": 0, "index": 0})
        self.chunks = 0
        self.busy_s: Counter[str] = Counter()  # seconds spent in each stage, over all chunks

    def checkpoint(self, run_key: str, chunk_requests: int, decisions: list[Any]) -> Checkpoint:
        return Checkpoint(
            run_key=run_key,
            chunk_requests=chunk_requests,
            chunks=self.chunks,
            store_rows=self.store.count,
            exact_rows=self.exact.seen.rows,
            generation=self.generation.summary() | {"elapsed_s": self.generation.elapsed_s},
            exact_counts=dict(self.exact_counts),
            near_counts=dict(self.near_counts),
            quality_counts=self.quality.counts,
            busy_s=dict(self.busy_s),
            topics=list(self.near.topics),
            decisions=decisions,
        )

    def restore(self, cp: Checkpoint) -> None:
        """Back to the state after the checkpoint's last chunk; rows appended after it (a
        chunk cut short by the kill) are cut off."""
        self.chunks = cp.chunks
        self.store.truncate(cp.store_rows)
        self.exact.seen.truncate(cp.exact_rows)
        gen = cp.generation
        for name in TOTALS:
            setattr(self.generation, name, gen.get(name, 0))
        self.generation.failures = Counter(gen.get("failures", {}))
        self.generation.retry_reasons = Counter(gen.get("retry_reasons", {}))
        self.generation.budget_exhausted = bool(gen.get("budget_exhausted"))
        self.generation.rate = list(gen.get("rate", []))
        self.exact_counts = Counter(cp.exact_counts)
        self.near_counts = Counter(cp.near_counts)
        self.quality.counts = cp.quality_counts
        self.busy_s = Counter(cp.busy_s)
        self.near.topics = {k: i for i, k in enumerate(cp.topics)}

    def chunk_path(self, number: int) -> Path:
        return self.work / "chunks" / f"chunk-{number:05d}.parquet"

    def failures_path(self, number: int) -> Path:
        return self.work / "chunks" / f"failures-{number:05d}.parquet"

    def close(self) -> None:
        self.quality.close()
        self.judge.close()


class ChunkPipeline:
    """Process one generated chunk (see the module docstring)."""

    def __init__(self, state: RunState, version: VersionWriter) -> None:
        self.state, self.version = state, version

    def process(self, chunk: Chunk, report: GenerationReport) -> ChunkStats:
        st, t = self.state, time.perf_counter
        seconds: dict[str, float] = {}
        t0 = t()
        add_report(st.generation, report)
        ids: dict[str, np.ndarray] = {}  # the documents' tokens, counted once, stored as is
        docs, failures = to_documents(
            chunk.plan, report.results, run_id=st.run_id, encoding=st.encoding, token_ids=ids
        )
        self.version.plan.write(chunk.plan)
        write_table_atomically(to_table(failures, GenerationResult), st.failures_path(chunk.number))
        seconds["documents"] = t() - t0

        t0 = t()
        exact = st.exact.run(docs)
        st.exact_counts.update({"input": len(docs), "kept": len(exact.kept), **exact.counts})
        seconds["dedup_exact"] = t() - t0
        t0 = t()
        quality = st.quality.run(exact.kept)
        seconds["quality"] = t() - t0
        t0 = t()
        # its counts ride with the chain's: checkpointed and in counts.filter with them
        judged = st.judge.run(quality.kept, st.quality.counts)
        seconds[st.judge.name] = t() - t0
        t0 = t()
        near = st.near.run(judged.kept, st.exact.words, st.exact.keys, chunk.number)
        st.near_counts.update({"input": len(judged.kept), "index": len(near.rejected)})
        seconds["dedup_minhash"] = t() - t0

        crash_point("filter.done")
        t0 = t()
        rejected = exact.rejected + quality.rejected + judged.rejected + near.rejected
        self._spill(chunk.number, docs, rejected, near.kept, ids)
        seconds["spill"] = t() - t0
        st.chunks = chunk.number + 1
        st.busy_s.update(seconds)
        return ChunkStats(
            chunk.number, len(chunk.plan), len(docs), len(failures), len(rejected),
            len(near.kept), seconds,
        )  # fmt: skip

    def _spill(
        self,
        number: int,
        docs: list[Any],
        rejected: list[Rejected],
        kept: list[Any],
        ids: dict[str, np.ndarray],
    ) -> None:
        """Every document of the chunk in plan order: rejected ones with their reason,
        candidates with CANDIDATE, their store row and their tokens (`input_ids`, which the
        version's primary token shards are written from)."""
        position = {d.id: i for i, d in enumerate(docs)}
        rows = self.state.near.rows
        records = [
            *rejected,
            *(Rejected(**d.model_dump(), reason=CANDIDATE) for d in kept),
        ]
        records.sort(key=lambda r: position[r.id])
        table = to_table(records, Rejected)
        cand = [rows.get(r.id, -1) if r.reason == CANDIDATE else -1 for r in records]
        table = table.append_column("cand_row", pa.array(cand, pa.int64()))
        tokens = [ids[r.id] if r.reason == CANDIDATE else None for r in records]
        table = table.append_column("input_ids", pa.array(tokens, pa.list_(pa.uint32())))
        write_table_atomically(table, self.state.chunk_path(number))
