"""Crash-proof runs: the nightly flow killed with SIGKILL at named points (through the
`BOOKSMITH_CRASH_AT` hook) and at random ones, between and inside chunks, then run again, ends
with the dataset an uninterrupted run writes: the same ids and text hashes, no document twice,
no finished generation requested twice, no half-written directory left behind. The rerun
resumes at the last checkpointed chunk, and after a kill past the manifest it is a no-op that
names the version."""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
from collections import Counter
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import yaml

from booksmith.schemas import GenerationRequest, Message
from booksmith.schemas.crashpoints import ENV as CRASH_ENV
from booksmith.shards.version_dir import OWNER, STATE_DIR, is_dataset, list_versions, read_manifest
from tests.conftest import fake_backend_config
from tests.fakeserver import FakeServer, request_key

BOOKSMITH = [sys.executable, "-m", "booksmith"]
KILLED = -signal.SIGKILL
LIMIT = 12
CHUNK = 4  # three chunks: kills fall between and inside them
CONCURRENCY = 2
SEED = 7
RUN_TIMEOUT_S = 300

# The points in the order a run passes them (schemas/crashpoints.py); the hook counts passes.
POINTS = (
    "generate.result",  # once per generated result (LIMIT times in a first run)
    "filter.done",  # once per chunk, after its filters
    "chunk.done",  # once per chunk, after its checkpoint
    "shards.file",  # once per file renamed into place (text, tokens, rejected, plan, ...)
    "shards.manifest",
    "index.commit",
    "index.committed",
)
NAMED = (
    "generate.result:3",
    "generate.result:7",  # in the second chunk's generation, the first chunk filtering
    "filter.done",
    "filter.done:2",  # inside the second chunk
    "chunk.done:1",  # between the first and the second chunk
    "chunk.done:3",  # after the last chunk, before the version is written
    "shards.file:1",
    "shards.file:3",
    "shards.manifest",
    "index.commit",
    "index.committed",
)


def _draw_spec(rng: random.Random) -> tuple[str, float]:
    """A random point and a uniform number that picks its n (see `_resolve`)."""
    return rng.choice(POINTS), rng.random()


def _random_chains(n: int, seed: int = 7) -> list[tuple[tuple[str, float], ...]]:
    """`n` random cases, each a first kill and a second one chained on the rerun."""
    rng = random.Random(seed)
    return [(_draw_spec(rng), _draw_spec(rng)) for _ in range(n)]


RANDOM = _random_chains(2)


def _resolve(point: str, u: float, files_per_version: int) -> str:
    """`point:n` with n within the times a run passes the point."""
    if point == "generate.result":
        return f"{point}:{1 + int(u * LIMIT)}"
    if point == "shards.file":
        return f"{point}:{1 + int(u * files_per_version)}"
    if point in ("filter.done", "chunk.done"):
        return f"{point}:{1 + int(u * LIMIT / CHUNK)}"
    return point


# -- helpers ---------------------------------------------------------------------------------


def _server_key(row: dict[str, Any]) -> str:
    """The fake server's key for a planned request (a row of plan.parquet)."""
    req = GenerationRequest(**{**row, "messages": [Message(**m) for m in row["messages"]]})
    s = req.sampling
    body = {
        "model": req.model,
        "messages": [m.model_dump() for m in req.messages],
        "max_tokens": s.max_tokens,
        "temperature": s.temperature,
        "top_p": s.top_p,
        "seed": s.seed,
    }
    return request_key(body)


def booksmith_run(
    config: Path, api: str, crash: str | None = None
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PREFECT_API_URL": api}
    env.pop(CRASH_ENV, None)
    if crash:
        env[CRASH_ENV] = crash
    return subprocess.run(
        [*BOOKSMITH, "run", "--config", str(config)],
        env=env,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
    )


def cached_ids(out: Path) -> set[str]:
    """Request ids whose response is in the durable cache."""
    db_path = out / STATE_DIR / "responses.sqlite"
    if not db_path.exists():
        return set()
    with closing(sqlite3.connect(db_path)) as db:
        try:
            return {r[0] for r in db.execute("SELECT request_id FROM responses")}
        except sqlite3.OperationalError:  # killed before the table was made
            return set()


def kept_rows(version: Path) -> list[tuple[str, str]]:
    """(id, text_sha256) of a version's kept documents."""
    if not (version / "text").is_dir():
        return []
    table = pq.read_table(version / "text", columns=["id", "text_sha256"])
    ids, hashes = table.column("id").to_pylist(), table.column("text_sha256").to_pylist()
    return list(zip(ids, hashes, strict=True))


def unfinished_dirs(out: Path) -> list[str]:
    """Directories under `out` that are not datasets (`_state` aside)."""
    return sorted(
        p.name for p in out.iterdir() if p.is_dir() and p.name != STATE_DIR and not is_dataset(p)
    )


def check_accounting(version: Path) -> dict[str, Any]:
    """planned = kept + rejected + failed (+ skipped by the budget), in the manifest and in the
    files, and every planned request is accounted for exactly once."""
    manifest = read_manifest(version)
    gen = manifest.counts.generate
    kept = manifest.documents
    rejected = manifest.counts.rejected
    assert gen.planned == kept + rejected + gen.failed + gen.skipped_budget, manifest["counts"]
    plan_ids = pq.read_table(version / "plan.parquet", columns=["id"]).column("id").to_pylist()
    assert len(plan_ids) == gen.planned
    ids = [i for i, _ in kept_rows(version)]
    if (version / "rejected").is_dir():
        ids += pq.read_table(version / "rejected", columns=["id"]).column("id").to_pylist()
    failures = pq.read_table(version / "failures.parquet", columns=["request_id"])
    ids += failures.column("request_id").to_pylist()
    assert len(ids) == kept + rejected + gen.failed
    if not gen.skipped_budget:
        assert Counter(ids) == Counter(plan_ids), "each planned request exactly once"
    return manifest


def crash_config(base_url: str, out: Path) -> dict[str, Any]:
    # A generous timeout: a retry after a slow answer on a busy machine would request a key
    # twice for a reason other than the kill.
    cfg = fake_backend_config(base_url, out, max_concurrency=CONCURRENCY, timeout_s=30.0)
    cfg["seed"] = SEED
    cfg["plan"]["limit"] = LIMIT
    cfg["plan"]["chunk_requests"] = CHUNK
    return cfg


# -- the hook itself -----------------------------------------------------------------------


def test_crash_point_kills_on_the_nth_pass_only() -> None:
    code = (
        "from booksmith.schemas.crashpoints import crash_point\n"
        "for i in range(1, 4):\n"
        "    crash_point('b.other')\n"
        "    crash_point('a.point')\n"
        "    print(i, flush=True)\n"
    )

    def run(spec: str | None) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if k != CRASH_ENV}
        if spec is not None:
            env[CRASH_ENV] = spec
        return subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
        )

    assert run(None).stdout.split() == ["1", "2", "3"]
    assert run("a.poin").stdout.split() == ["1", "2", "3"]  # names match exactly
    first = run("a.point")
    assert first.returncode == KILLED and first.stdout.split() == []
    third = run("a.point:3")
    assert third.returncode == KILLED and third.stdout.split() == ["1", "2"]
    assert run("a.point:4").returncode == 0


# -- the uninterrupted run -------------------------------------------------------------------


@dataclass
class Baseline:
    kept: set[tuple[str, str]]
    keys: dict[str, str]  # request id -> server key
    files_per_version: int  # shard files renamed into place before the card and manifest
    manifest: dict[str, Any] = field(repr=False)


@pytest.fixture(scope="module")
def server() -> Any:
    with FakeServer({"latency_s": 0.05}) as srv:  # fault-free: every key needs one request
        yield srv


@pytest.fixture(scope="module")
def baseline(
    prefect_api: str, server: FakeServer, tmp_path_factory: pytest.TempPathFactory
) -> Baseline:
    root = tmp_path_factory.mktemp("baseline")
    out = root / "out"
    config = root / "config.yaml"
    config.write_text(yaml.safe_dump(crash_config(server.base_url, out), sort_keys=False))
    server.reset()
    result = booksmith_run(config, prefect_api)
    assert result.returncode == 0, result.stderr[-3000:]
    (version,) = list_versions(out)
    manifest = check_accounting(version)
    plan = pq.read_table(version / "plan.parquet").to_pylist()
    keys = {row["id"]: _server_key(row) for row in plan}
    assert len(keys) == LIMIT
    stats = server.stats()
    assert stats["by_key"] == {k: 1 for k in keys.values()}, "one request per key"
    kept = kept_rows(version)
    assert len(kept) == len(set(kept)) > LIMIT // 2, "most documents pass the filters"
    server.reset()
    return Baseline(set(kept), keys, len(manifest.shards), manifest)


# -- kill, rerun, compare --------------------------------------------------------------------


@dataclass
class Kill:
    spec: str
    returncode: int
    cached: set[str]  # request ids in the response cache right after the process ended
    chunks_done: int  # chunks the unfinished run had checkpointed (0: none, or no such run)
    published: bool  # the kill came after the version's manifest


def chunks_checkpointed(out: Path) -> int:
    """Chunks done by the unfinished run under `out`, from its checkpoint."""
    for name in unfinished_dirs(out):
        path = out / STATE_DIR / "runs" / name / "checkpoint.json"
        if path.exists():
            return int(json.loads(path.read_text())["chunks"])
    return 0


def _cases() -> list[Any]:
    cases = [pytest.param([(p, None)], id=p) for p in NAMED]
    for i, chain in enumerate(RANDOM):
        label = "+".join(f"{p}@{u:.2f}" for p, u in chain)
        cases.append(pytest.param(list(chain), id=f"random{i}-{label}"))
    return cases


@pytest.mark.slow
@pytest.mark.parametrize("chain", _cases())
def test_sigkill_then_rerun_equals_an_uninterrupted_run(
    chain: list[tuple[str, float | None]],
    prefect_api: str,
    server: FakeServer,
    baseline: Baseline,
    tmp_path: Path,
    write_config,
) -> None:
    out = tmp_path / "out"
    config = write_config(crash_config(server.base_url, out))
    server.reset()
    specs = [p if u is None else _resolve(p, u, baseline.files_per_version) for p, u in chain]

    kills: list[Kill] = []
    finished: subprocess.CompletedProcess[str] | None = None
    for i, spec in enumerate(specs):
        before = len(list_versions(out))
        result = booksmith_run(config, prefect_api, crash=spec)
        if i == 0 or result.returncode != 0:
            # The first point is always reached; a chained one may not be (all cached, say).
            assert result.returncode == KILLED, (spec, result.returncode, result.stderr[-3000:])
        if result.returncode == 0:
            finished = result
            break
        published = len(list_versions(out)) > before
        kills.append(
            Kill(spec, result.returncode, cached_ids(out), chunks_checkpointed(out), published)
        )
        # A run killed before its manifest leaves no dataset, only its own unfinished
        # directory (an earlier one was swept at the start); one killed after it, a version.
        versions = list_versions(out)
        for version in versions:
            read_manifest(version)  # every listed version is complete
        unfinished = unfinished_dirs(out)
        assert len(unfinished) == (1 if len(versions) == before else 0), (spec, unfinished)
    if finished is None:  # rerun without the hook: it must succeed at once
        finished = booksmith_run(config, prefect_api)
        assert finished.returncode == 0, (specs, finished.stderr[-3000:])

    # No half-written directory remains, and no version still claims an owner.
    assert unfinished_dirs(out) == [], specs
    versions = list_versions(out)
    assert versions and finished.stdout.strip().endswith(str(versions[-1]))
    for version in versions:
        assert not (version / OWNER).exists(), version
        check_accounting(version)

    # The final dataset (kept documents over every version) is the uninterrupted run's.
    per_version = {v.name: kept_rows(v) for v in versions}
    all_kept = [row for rows in per_version.values() for row in rows]
    ids = Counter(i for i, _ in all_kept)
    assert [i for i, n in ids.items() if n > 1] == [], "a document kept twice"
    assert set(all_kept) == baseline.kept, specs

    # No generation requested twice: every key that was in the cache when a run died is
    # never requested again; only requests in flight at a kill (their answer lost with the
    # process) may be made again: at most `max_concurrency` per kill (the next chunk generates
    # while one is filtered, so a kill outside generation can cut requests short too).
    stats = server.stats()
    by_key = Counter(stats["by_key"])
    assert set(by_key) == set(baseline.keys.values()), "the same requests as the baseline"
    assert all(stats["completed_by_key"].get(k, 0) >= 1 for k in baseline.keys.values())
    for kill in kills:
        for rid in kill.cached:
            key = baseline.keys[rid]
            assert by_key[key] == 1, (kill.spec, rid, by_key[key])
    repeated = {k: n for k, n in by_key.items() if n > 1}
    print(specs, [(k.spec, len(k.cached)) for k in kills], "requested again:", repeated)
    generation_kills = [k for k in kills if len(k.cached) < LIMIT]
    assert all(n == 2 for n in repeated.values()) or len(generation_kills) > 1, repeated
    assert len(repeated) <= CONCURRENCY * len(generation_kills), (specs, repeated)
    if not generation_kills:
        assert by_key == Counter({k: 1 for k in baseline.keys.values()}), specs

    # One version: a rerun after a kill past the manifest is a no-op that names it.
    assert len(versions) == 1, specs
    counts = read_manifest(versions[-1]).counts
    last = counts.generate
    if kills and not kills[-1].published:
        # The rerun resumed at the last checkpointed chunk (its chunks neither generated nor
        # filtered again), and found in the cache the rest of what the kill left there.
        assert counts.chunks.resumed == kills[-1].chunks_done, (specs, counts.chunks)
        if not kills[-1].chunks_done:
            assert last.cached == len(kills[-1].cached), (specs, last)
            assert last.requests - last.retries == LIMIT - len(kills[-1].cached), last
        else:
            assert last.cached + last.requests - last.retries <= LIMIT, last


# -- the embedded model ---------------------------------------------------------------------


@pytest.mark.e2e
@pytest.mark.slow
def test_sigkill_on_the_embedded_model_then_rerun(
    prefect_api: str, tmp_path: Path, write_config
) -> None:
    """llama.cpp is not bitwise deterministic under batching, so the texts may differ from an
    uninterrupted run's; what must hold: nothing twice, nothing requested twice, every
    planned request accounted for."""
    out = tmp_path / "out"
    planned = 4
    config = write_config(
        {
            "seed": 11,
            "plan": {"limit": planned},
            "generation": {"sampling": {"max_tokens": 48}},
            "output": {"dir": str(out)},
            "fill": {"documents": None},
            # 48-token answers are cut short and rejected: publish the version anyway, its
            # accounting is what this test reads
            "publish": {"min_documents": 0},
        }
    )
    killed = booksmith_run(config, prefect_api, crash="generate.result:2")
    assert killed.returncode == KILLED, killed.stderr[-3000:]
    assert list_versions(out) == []
    at_kill = cached_ids(out)
    assert len(at_kill) >= 2

    rerun = booksmith_run(config, prefect_api)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert unfinished_dirs(out) == []
    (version,) = list_versions(out)
    manifest = check_accounting(version)
    gen = manifest.counts.generate
    assert gen.planned == planned

    plan_ids = pq.read_table(version / "plan.parquet", columns=["id"]).column("id").to_pylist()
    with closing(sqlite3.connect(out / STATE_DIR / "responses.sqlite")) as db:
        rows = [r[0] for r in db.execute("SELECT request_id FROM responses")]
    assert sorted(rows) == sorted(plan_ids), "one cached response per planned request"
    # What finished before the kill came from the cache; only the rest was requested.
    assert gen.cached == len(at_kill), gen
    fresh = gen.requests - gen.retries  # requests made at least once in the rerun
    assert fresh == planned - len(at_kill) or (gen.failed and fresh < planned), gen
    ids = [i for i, _ in kept_rows(version)]
    assert len(ids) == len(set(ids))
