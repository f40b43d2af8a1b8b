"""A streaming run's pieces in one object: its state, its version writer, its chunk pipeline
and its rounds, opened together and closed together (the flow wires their calls)."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from booksmith.filters.dedup import DedupIndex
from booksmith.generation.source_state import record_planned
from booksmith.pipeline.checkpoint import Checkpoint
from booksmith.pipeline.chunks import Chunk, ChunkPipeline, ChunkStats, RunState
from booksmith.pipeline.finalize import Finished, Tally, commit_index, tally, write_chunks
from booksmith.pipeline.grounded import MixedPlan
from booksmith.pipeline.judge_stage import NAME as JUDGE
from booksmith.pipeline.judge_stage import WORK as JUDGE_WORK
from booksmith.pipeline.rounds import Rounds
from booksmith.prompts import PromptLibrary
from booksmith.schemas import TopicSeed
from booksmith.schemas.config import EncodingFile, RunConfig
from booksmith.schemas.manifest import Counts, Manifest
from booksmith.shards.dataset import VersionWriter
from booksmith.shards.encodings import EncodingSpec
from booksmith.shards.version_dir import (
    RUNS_DIR,
    abandoned_runs,
    list_versions,
    read_manifest,
    reclaim_run_dir,
    state_dir,
)


def work_dir(out: Path, run_id: str) -> Path:
    return state_dir(out) / RUNS_DIR / run_id


def encoding_spec(entry: str | EncodingFile) -> EncodingSpec:
    if isinstance(entry, str):
        return EncodingSpec(entry)
    return EncodingSpec(entry.name, entry.bpe_file, entry.sha256)


class StreamingRun:
    """One run of the nightly pipeline over chunks (see pipeline/__init__.py)."""

    def __init__(
        self,
        cfg: RunConfig,
        run_id: str,
        seeds: list[TopicSeed],
        seed: int,
        index: DedupIndex | None,
        key: str,
        grounded: MixedPlan | None = None,  # the estimate's plan of the sources, to replay
    ) -> None:
        self.cfg, self.run_id, self.seed, self.index, self.key = cfg, run_id, seed, index, key
        out = cfg.output.dir
        self.work = work_dir(out, run_id)
        checkpoint = Checkpoint.load(self.work)
        if checkpoint and (checkpoint.run_key, checkpoint.chunk_requests) != (
            key,
            cfg.plan.chunk_requests,
        ):
            checkpoint = None  # another run's, or cut otherwise: start this one afresh
        if checkpoint is None:
            shutil.rmtree(self.work, ignore_errors=True)
        self.state = RunState(
            self.work,
            run_id=run_id,
            encoding=cfg.output.encoding,
            filters=cfg.filters,
            dedup=cfg.dedup,
            index=index,
            state=state_dir(out),
            workers=cfg.filters.workers,
        )
        self.version = VersionWriter(
            out / run_id, shard_rows=cfg.output.shard_rows, shard_bytes=cfg.output.shard_bytes,
            encoded=cfg.output.encoding, pack_seq_len=cfg.output.pack_seq_len,
        )  # fmt: skip
        self.pipeline = ChunkPipeline(self.state, self.version)
        self.rounds = Rounds(seeds, cfg, seed, grounded=grounded)
        self.started = time.perf_counter()
        self.resumed = 0  # chunks completed before a kill, not generated nor filtered again
        if checkpoint is not None:
            self.state.restore(checkpoint)
            self.rounds.decisions = checkpoint.decisions
            self.resumed = checkpoint.chunks

    def replay(self, chunk: Chunk) -> None:
        """A chunk completed before the kill: only its plan rows are written again."""
        self.version.plan.write(chunk.plan)

    def process(self, chunk: Chunk, report: Any) -> ChunkStats:
        """One chunk, then its checkpoint (a restart resumes after it)."""
        stats = self.pipeline.process(chunk, report)
        checkpoint = self.state.checkpoint(
            self.key, self.cfg.plan.chunk_requests, self.rounds.decisions
        )
        checkpoint.save(self.work)
        return stats

    def tally(self) -> Tally:
        return tally(self.state)

    def write(self, counts_extra: dict[str, Any]) -> tuple[Manifest, Finished]:
        """Decide the near-duplicates, write every shard, then the card and manifest."""
        cfg, st = self.cfg, self.state
        t0 = time.perf_counter()
        axes = PromptLibrary(cfg.plan.axes, cfg.plan.templates).axes
        done = write_chunks(
            st,
            self.version,
            {"audience": list(axes.audiences), "style": list(axes.styles),
             "format": list(axes.formats)},
        )  # fmt: skip
        t1 = time.perf_counter()
        self.version.write_tokens(
            cfg.output.encoding,
            [encoding_spec(e) for e in cfg.output.encodings],
            cfg.output.pack_seq_len,
        )
        filters = {
            "dedup_exact": dict(st.exact_counts),
            **st.quality.counts,
            "dedup_minhash": {
                "input": st.near_counts["input"],
                "kept": done.documents,
                "dedup_minhash": st.near_counts["index"] + done.dropped_in_run,
            },
        }
        if not cfg.dedup.exact:
            filters.pop("dedup_exact")
        judge = None
        if JUDGE in filters:  # its verdicts stay with the filters, its work goes apart
            judge = {k: n for k, n in filters[JUDGE].items() if k in JUDGE_WORK}
            filters[JUDGE] = {k: n for k, n in filters[JUDGE].items() if k not in JUDGE_WORK}
        grounded = self.rounds.grounded
        sources = {"sources": grounded.account()} if grounded is not None else {}
        counts = Counts.model_validate({
            "plan": {"requests": self.rounds.planned, **counts_extra.get("plan", {}), **sources},
            "fill": self.rounds.account(),
            "generate": st.generation.summary(),
            "filter": filters,
            "judge": judge,
            "kept": done.documents,
            "rejected": done.rejected,
            "chunks": {
                "count": st.chunks,
                "requests": cfg.plan.chunk_requests,
                "resumed": self.resumed,
                # where the time went: generation and each stage summed over chunks (they
                # overlap, so the sum can exceed the wall time), the final pass, the whole run
                "busy_s": {
                    "generate": round(st.generation.elapsed_s, 3),
                    **{k: round(v, 3) for k, v in st.busy_s.items()},
                    "final_pass": round(t1 - t0, 3),
                    "tokens": round(time.perf_counter() - t1, 3),
                },
                "wall_s": round(time.perf_counter() - self.started, 3),
            },
        })  # fmt: skip
        manifest = self.version.finish(
            run_id=self.run_id,
            encoding=cfg.output.encoding,
            config=counts_extra.get("config", cfg.model_dump(mode="json")),
            config_hash=cfg.config_hash(),
            counts=counts,
            seed=self.seed,
            run_key=self.key,
            diversity=done.diversity,
            quality=done.quality,
            card=cfg.output.card.model_dump(exclude_none=True),
        )
        self.finished = done
        return manifest, done

    def commit_index(self) -> int:
        return commit_index(self.index, self.state, self.run_id, self.finished.kept_rows)

    def commit_sources(self) -> Path | None:
        """Record the source passages this published run planned: later runs skip them."""
        if self.rounds.grounded is None:
            return None
        return record_planned(self.cfg.output.dir, self.run_id, self.rounds.grounded.keys())

    def close(self, ok: bool) -> None:
        self.state.close()
        if not ok:
            self.version.abort()
        else:
            shutil.rmtree(self.work, ignore_errors=True)

    def __enter__(self) -> StreamingRun:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close(ok=exc_type is None)


def completed_version(out: Path, key: str) -> Path | None:
    """The version a run with this key already published, if any (a rerun is then a no-op)."""
    for version in reversed(list_versions(out)):
        try:
            if read_manifest(version).run_key == key:
                return version
        except (FileNotFoundError, ValueError):
            continue
    return None


def resumable_run(out: Path, key: str) -> str | None:
    """The run id of an unfinished run with this key whose process is gone: this process
    takes it over and resumes it at its last checkpoint."""
    for path in abandoned_runs(out):
        checkpoint = Checkpoint.load(work_dir(out, path.name))
        if checkpoint is not None and checkpoint.run_key == key:
            reclaim_run_dir(path)
            return path.name
    return None
