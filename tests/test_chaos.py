"""Kill anywhere, same rows (issue 15, point 8): a real `booksmith run` against the fake server
(latency, faults, several chunks, a fill round) is killed with SIGKILL from outside, its whole
process group at once, at moments drawn from a seeded RNG: while it starts, after a random number
of requests the server has received, and after its generation, while it writes the version.
Each kill is followed by the same command with the same config and seed, until a run completes.

Then the final version must be the uninterrupted run's, row for row and column for column, in
every file of rows it has (text, rejected, token shards, plan.parquet, failures.parquet), with
only the run id, the timestamps and the measured latency told apart; nothing whose answer
reached the response cache was asked of the server again; at most `max_concurrency` requests
per kill (those in flight) were asked again; `booksmith verify` passes; there is one version.

tests/test_crash.py kills at the named crash points (schemas/crashpoints.py) from inside; this
test uses no hook at all: the kills fall wherever the process happens to be."""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import time
from collections import Counter
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from booksmith.schemas.crashpoints import ENV as CRASH_ENV
from booksmith.shards.version_dir import STATE_DIR, list_versions, read_manifest
from tests.conftest import fake_backend_config
from tests.fakeserver import FakeServer
from tests.test_crash import (
    BOOKSMITH,
    _server_key,
    check_accounting,
    chunks_checkpointed,
    unfinished_dirs,
)

SEED = 23
LIMIT = 18  # the first round: four chunks of 5 (the last one short)
CHUNK = 5
CONCURRENCY = 3
# The faults keep fewer than 17: one fill round follows, of at most 8 requests (a small run).
FILL = {"documents": 17, "max_rounds": 2, "max_requests": LIMIT + 8}
# Every kind of answer a run meets, at rates that do not trip the circuit breaker: transient
# faults (a 429, a 500/503) that succeed when asked again, answers the filters reject
# (truncated, empty, near-duplicates), permanent failures (400, content filter).
FAULTS: dict[str, Any] = {
    "latency_s": 0.15,
    "latency_jitter_s": 0.1,
    "rate_limit": 0.08,
    "retry_after_s": 0.05,
    "server_error": 0.08,
    "truncated": 0.08,
    "empty": 0.05,
    "bad_request": 0.08,
    "content_filter": 0.06,
    "near_duplicate": 0.25,
    "near_duplicate_pool": 3,
}
# The kills: while the process starts (before its first request), after the server answered
# 1-3 more requests (in generation, of any chunk or round, with the filters of the chunk before
# running alongside; the answer on its way to the cache or just in it, others in flight), after
# generation (the final pass, the shards, the manifest, the index commit, the report, or a
# no-op rerun), and once more after the version's manifest appeared. The first two kinds always
# land before the run could end (the answers a run needs outnumber those the kills wait for),
# so there are at least STARTUP + ANSWERS kills.
STARTUP, ANSWERS, TAIL = 2, 8, 1
# Replies that are not a 200 (those count in `answered_by_key`): the faults answered so.
ERROR_REPLIES = ("rate_limit", "server_error", "bad_request")
POLL_S = 0.02
RUN_TIMEOUT_S = 300
# Columns that tell two runs of the same plan apart, and nothing else may differ: the run id,
# when each answer came back, and how long it took (a measurement, not an answer).
NORMALISED = {"run_id", "created_at", "latency_s"}


def chaos_config(base_url: str, out: Path) -> dict[str, Any]:
    # A generous timeout: a retry after a slow answer on a busy machine would ask a key again
    # for a reason other than a kill.
    cfg = fake_backend_config(base_url, out, max_concurrency=CONCURRENCY, timeout_s=30.0)
    cfg["seed"] = SEED
    cfg["plan"].update({"limit": LIMIT, "chunk_requests": CHUNK})
    cfg["fill"] = dict(FILL)
    return cfg


# -- one run, watched and perhaps killed -----------------------------------------------------


@dataclass(frozen=True)
class Trigger:
    """When to kill: `startup` after `at_s` seconds or at the first request, whichever comes
    first (so a start faster than the uninterrupted run's is still cut); `answers` once the
    server answered `n` more requests; `tail` `at_s` seconds after every planned request's
    answer is in the cache (after `start_s`, an uninterrupted run's start, when it was there
    before this run asked anything); `published` `at_s` seconds after the version's manifest
    appeared (the index commit, the report; the rerun must then be a no-op)."""

    kind: str
    at_s: float = 0.0
    n: int = 0
    start_s: float = 0.0


@dataclass
class Attempt:
    trigger: Trigger | None
    killed: bool
    returncode: int
    elapsed_s: float
    first_request_s: float | None  # since the start, None if it asked nothing
    last_request_s: float | None
    stats: dict[str, Any]  # the server's, after the process group is gone
    asked: Counter[str]  # requests the server had from this run, by key
    cached: set[str]  # request ids answered in the cache then (responses, permanent failures)
    chunks_done: int  # chunks the unfinished run had checkpointed then
    versions: int  # versions under the output then (1: the kill came after the manifest)
    log: str


def _server_stats(server: FakeServer) -> dict[str, Any]:
    stats = server.stats()
    stats.pop("arrivals", None)
    return stats


def answered(stats: dict[str, Any]) -> int:
    """Requests the server has sent a reply to (a completion or an error)."""
    return sum(stats["answered_by_key"].values()) + sum(
        stats["faults"].get(kind, 0) for kind in ERROR_REPLIES
    )


def cache_ids(out: Path) -> set[str]:
    """Request ids whose answer is in the durable cache (generation/cache.py): responses, and
    the permanent failures a rerun takes from there instead of asking again."""
    db_path = out / STATE_DIR / "responses.sqlite"
    if not db_path.exists():
        return set()
    with closing(sqlite3.connect(db_path)) as db:
        try:
            done = {r[0] for r in db.execute("SELECT request_id FROM responses")}
            done |= {
                r[0] for r in db.execute("SELECT request_id FROM failures WHERE permanent = 1")
            }
        except sqlite3.OperationalError:  # killed before the tables were made
            return set()
    return done


def watch_run(
    config: Path,
    api: str,
    server: FakeServer,
    log: Path,
    trigger: Trigger | None = None,
    every_id: set[str] | None = None,
) -> Attempt:
    """`booksmith run` in its own session (process group), killed there when `trigger` fires."""
    env = {**os.environ, "PREFECT_API_URL": api}
    env.pop(CRASH_ENV, None)  # no hook: this test kills from outside
    before = _server_stats(server)
    base, served = before["requests"], answered(before)
    first: float | None = None
    last: float | None = None
    seen = base
    killed = False
    out = Path(yaml.safe_load(config.read_text())["output"]["dir"])
    answered_all: float | None = None  # when every planned request's answer was cached
    published: float | None = None  # when the version appeared
    with log.open("w") as sink:
        start = time.monotonic()
        proc = subprocess.Popen(
            [*BOOKSMITH, "run", "--config", str(config)],
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            while proc.poll() is None:
                now = time.monotonic() - start
                if now > RUN_TIMEOUT_S:
                    raise TimeoutError(f"booksmith run still running after {RUN_TIMEOUT_S} s")
                stats = _server_stats(server)
                if stats["requests"] != seen:
                    seen = stats["requests"]
                    last = now
                    first = now if first is None else first
                if (
                    trigger is not None
                    and trigger.kind == "tail"
                    and answered_all is None
                    and every_id is not None
                    and every_id <= cache_ids(out)
                ):
                    answered_all = now if seen > base else trigger.start_s
                if trigger is not None and trigger.kind == "published" and published is None:
                    published = now if list_versions(out) else None
                news = (seen - base, answered(stats) - served)
                since = published if trigger is not None and trigger.kind == "published" else None
                if trigger is not None and _fires(trigger, now, news, answered_all or since):
                    os.killpg(proc.pid, signal.SIGKILL)
                    killed = True
                    break
                time.sleep(POLL_S)
        finally:
            if proc.poll() is None and not killed:  # a failing test leaves nothing running
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        elapsed = time.monotonic() - start
    if killed:
        # Children in the group (none today) die with it; wait until the group is gone.
        _wait_group_gone(proc.pid)
    after = _settled_stats(server)
    return Attempt(
        trigger=trigger,
        killed=killed,
        returncode=proc.returncode,
        elapsed_s=elapsed,
        first_request_s=first,
        last_request_s=last,
        stats=after,
        asked=Counter(after["by_key"]) - Counter(before["by_key"]),
        cached=cache_ids(out),
        chunks_done=chunks_checkpointed(out),
        versions=len(list_versions(out)),
        log=log.read_text(errors="replace"),
    )


def _fires(
    trigger: Trigger,
    now: float,
    news: tuple[int, int],
    since: float | None,
) -> bool:
    """`news`: (requests, answers) the server had in this run; `since`: when every planned
    request's answer was in the cache (`tail`), when the version appeared (`published`)."""
    asked, answers = news
    if trigger.kind == "startup":
        return now >= trigger.at_s or asked > 0
    if trigger.kind == "answers":
        return answers >= trigger.n
    assert trigger.kind in ("tail", "published")
    return since is not None and now >= since + trigger.at_s


def _settled_stats(server: FakeServer) -> dict[str, Any]:
    """The server's stats once a dead run's last requests are read and dropped."""
    stats = _server_stats(server)
    while True:
        time.sleep(0.1)
        again = _server_stats(server)
        if again == stats:
            return stats
        stats = again


def _wait_group_gone(pgid: int) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.01)
    raise AssertionError(f"process group {pgid} still alive after SIGKILL")


# -- comparing versions ----------------------------------------------------------------------


def row_files(version: Path) -> list[str]:
    """Every file of rows in a version, relative: text, rejected and token shards, the plan,
    the failures."""
    files = sorted(str(p.relative_to(version)) for p in version.rglob("*.parquet"))
    kinds = {f.split("/")[0] for f in files}
    assert kinds == {"text", "rejected", "tokens", "plan.parquet", "failures.parquet"}, kinds
    return files


def normalised(path: Path) -> tuple[pa.Schema, list[dict[str, Any]]]:
    table = pq.read_table(path)
    rows = table.to_pylist()
    for row in rows:
        if row.get("detail") and row.get("run_id"):  # a duplicate's evidence names its run
            row["detail"] = row["detail"].replace(row["run_id"], "<this run>")
        for name in NORMALISED & set(row):
            row[name] = None
    return table.schema, rows


def assert_same_rows(got: Path, want: Path) -> dict[str, int]:
    """Each file of rows of `got` equals `want`'s, row for row and column for column."""
    files = row_files(want)
    assert row_files(got) == files, "not the same files"
    rows_per_file = {}
    for name in files:
        got_schema, got_rows = normalised(got / name)
        want_schema, want_rows = normalised(want / name)
        assert got_schema.equals(want_schema), (name, got_schema, want_schema)
        assert len(got_rows) == len(want_rows), (name, len(got_rows), len(want_rows))
        for i, (a, b) in enumerate(zip(got_rows, want_rows, strict=True)):
            differ = sorted(k for k in b if a[k] != b[k])
            assert not differ, f"{name} row {i}: columns {differ} differ (id {b.get('id')})"
        rows_per_file[name] = len(want_rows)
    return rows_per_file


def draw_triggers(rng: random.Random, baseline: Attempt) -> list[Trigger]:
    """The kills, drawn from `rng` across an uninterrupted run's phases (its timings)."""
    assert baseline.first_request_s is not None and baseline.last_request_s is not None
    starting = baseline.first_request_s
    writing = baseline.elapsed_s - baseline.last_request_s
    early = [Trigger("startup", at_s=rng.uniform(0.2, 0.9) * starting) for _ in range(STARTUP)]
    early += [Trigger("answers", n=rng.randint(1, 3)) for _ in range(ANSWERS)]
    rng.shuffle(early)
    # The answers a run needs outnumber those the kills wait for (and one more per kill that
    # may come in before the kill lands), so every one of these kills lands before the end.
    assert sum(t.n for t in early) + ANSWERS <= answered(baseline.stats)
    # After the last answer: the last chunk's filters, the final pass, the shards, the manifest,
    # the index commit, the report (or, once there is a version, a no-op rerun).
    late = [Trigger("tail", at_s=rng.uniform(0, writing), start_s=starting) for _ in range(TAIL)]
    # Once the version is there (at once when an earlier kill came after it): the rerun after
    # this one is a no-op.
    return [*early, *late, Trigger("published", at_s=rng.uniform(0, 0.3))]


# -- the test --------------------------------------------------------------------------------


@pytest.mark.slow
def test_kill_anywhere_then_rerun_writes_the_same_rows(prefect_api: str, tmp_path: Path) -> None:
    with FakeServer(FAULTS) as server:
        # The uninterrupted run: its rows, its requests per key, its timings.
        calm_out = tmp_path / "calm" / "out"
        calm_cfg = tmp_path / "calm.yaml"
        calm_cfg.write_text(yaml.safe_dump(chaos_config(server.base_url, calm_out)))
        server.reset()
        calm = watch_run(calm_cfg, prefect_api, server, tmp_path / "calm.log")
        assert calm.returncode == 0, calm.log[-3000:]
        (want,) = list_versions(calm_out)
        check_accounting(want)
        manifest = read_manifest(want)
        rounds = manifest.counts.fill.rounds if manifest.counts.fill else []
        assert len(rounds) >= 2, "a fill round"
        assert manifest.counts.chunks is not None and manifest.counts.chunks.count >= 4
        assert manifest.counts.rejected and manifest.counts.generate.failed, "rejects, failures"
        plan = pq.read_table(want / "plan.parquet").to_pylist()
        key_of = {row["id"]: _server_key(row) for row in plan}
        calm_by_key = Counter(calm.stats["by_key"])
        assert set(calm_by_key) == set(key_of.values())
        assert any(n > 1 for n in calm_by_key.values()), "transient faults asked again"

        # The same run, killed again and again.
        out = tmp_path / "chaos" / "out"
        config = tmp_path / "chaos.yaml"
        config.write_text(yaml.safe_dump(chaos_config(server.base_url, out)))
        server.reset()
        triggers = draw_triggers(random.Random(SEED), calm)
        every_id = set(key_of)
        attempts: list[Attempt] = []
        for i, trigger in enumerate(triggers):
            attempt = watch_run(config, prefect_api, server, tmp_path / f"run{i}.log", trigger,
                                every_id)  # fmt: skip
            attempts.append(attempt)
            if not attempt.killed:  # it ended before its trigger: it must have completed
                assert attempt.returncode == 0, (trigger, attempt.log[-3000:])
                break
            assert attempt.returncode == -signal.SIGKILL
        if attempts[-1].killed:
            attempts.append(watch_run(config, prefect_api, server, tmp_path / "last.log"))
        final = attempts[-1]
        assert final.returncode == 0, final.log[-3000:]
        kills = [a for a in attempts if a.killed]
        summary = [
            (a.trigger.kind if a.trigger else "-", round(a.elapsed_s, 2), len(a.cached),
             a.chunks_done, a.versions)
            for a in attempts
        ]  # fmt: skip
        print("attempts (trigger, seconds, cached, chunks checkpointed, versions):", summary)
        assert len(kills) >= STARTUP + ANSWERS >= 10, summary

        # (3) One version, complete, verified; nothing unfinished left.
        versions = list_versions(out)
        assert len(versions) == 1, versions
        (got,) = versions
        assert unfinished_dirs(out) == []
        assert not (out / STATE_DIR / "failed").exists()
        check_accounting(got)
        verified = subprocess.run(
            [*BOOKSMITH, "verify", str(got)], capture_output=True, text=True, timeout=120
        )
        assert verified.returncode == 0, verified.stdout + verified.stderr

        # (1) Row for row, column for column, the uninterrupted run's files.
        rows = assert_same_rows(got, want)
        print("rows per file:", rows)

        # (2) Nothing that reached the cache was asked again: each key cached when a run was
        # killed has the count of requests it had then...
        by_key = Counter(final.stats["by_key"])
        for n, kill in enumerate(kills):
            then = Counter(kill.stats["by_key"])
            again = {rid: (then[key_of[rid]], by_key[key_of[rid]]) for rid in kill.cached
                     if by_key[key_of[rid]] != then[key_of[rid]]}  # fmt: skip
            assert not again, f"kill {n} ({kill.trigger}): cached, asked again: {again}"
        # ... and only what was in flight at a kill was asked again. A run's workers hold one
        # request each (`max_concurrency` of them) until its answer is in the cache, so at a
        # kill at most that many keys the run asked are not in the cache (sent, or answered
        # and not yet stored, or waiting to be retried); every request beyond the
        # uninterrupted run's is one of those asked again.
        id_of = {key: rid for rid, key in key_of.items()}
        open_at_kill = []
        for n, kill in enumerate(kills):
            unanswered = sorted(k for k in kill.asked if id_of[k] not in kill.cached)
            assert len(unanswered) <= CONCURRENCY, (n, kill.trigger, unanswered)
            open_at_kill.append(len(unanswered))
        assert set(by_key) == set(calm_by_key), "the same requests as the uninterrupted run"
        extra = {k: by_key[k] - calm_by_key[k] for k in by_key if by_key[k] != calm_by_key[k]}
        assert all(n > 0 for n in extra.values()), extra
        print(
            f"{len(kills)} kills; open at each: {open_at_kill}; asked again (beyond the "
            f"uninterrupted run): {extra}"
        )
        assert sum(extra.values()) <= sum(open_at_kill) <= CONCURRENCY * len(kills), extra


# -- what the chaos test found ---------------------------------------------------------------


def test_a_kill_inside_the_first_index_commit_leaves_an_index_the_rerun_opens(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The chaos test killed a run in its first MinHash index commit, after the segment was
    written and before index.json existed: every later run then refused the directory ("has
    files but no index.json"). A new index now writes its empty index.json first."""
    import numpy as np

    from booksmith.filters.dedup import FileIndex
    from booksmith.filters.dedup import file_index as module

    path = tmp_path / "minhash"
    num_perm = FileIndex(path).params.num_perm
    rng = np.random.default_rng(0)
    sigs = rng.integers(0, 2**32, size=(3, num_perm), dtype=np.uint32)
    exact = np.arange(3, dtype=np.uint64)

    def killed(*args: Any, **kwargs: Any) -> None:
        raise KeyboardInterrupt("killed after the segment, before index.json")

    with monkeypatch.context() as patch:
        patch.setattr(module, "build", killed)
        with pytest.raises(KeyboardInterrupt):
            FileIndex(path).add("run1", ["a", "b", "c"], sigs, exact)
    assert list((path / "segments").iterdir()), "the killed write left its segment"

    index = FileIndex(path)  # the rerun opens it...
    assert index.runs() == {}
    assert index.add("run1", ["a", "b", "c"], sigs, exact) == 3  # ... and commits again
    segments = sorted(p.name for p in (path / "segments").iterdir())
    assert len(segments) == 1 and FileIndex(path).runs() == {"run1": 3}, segments
