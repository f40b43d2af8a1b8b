"""The circuit breaker: a run against a broken endpoint stops in seconds, ends non-zero with
one line, plans nothing more, and a rerun against a working endpoint asks again only for what
was not answered. Transient faults at the rates the fault tests use never trip it."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from booksmith.generation.breaker import Breaker
from booksmith.schemas.config import BreakerSettings
from booksmith.shards.version_dir import list_versions, read_manifest
from tests.conftest import fake_backend_config
from tests.fakeserver import FakeServer

BOOKSMITH = [sys.executable, "-m", "booksmith"]


def test_trips_on_a_failing_window_and_not_on_transient_faults() -> None:
    s = BreakerSettings(window=50, min_requests=20, max_failure_share=0.9)
    dead = Breaker(s)
    for _ in range(19):
        dead.record("connection")
    assert dead.tripped is None  # fewer than min_requests seen
    dead.record("connection")
    assert dead.tripped and "failed 20 of the last 20 requests (connection: 20)" in dead.tripped

    rng = random.Random(7)
    healthy = Breaker(s)
    for _ in range(5_000):  # 20% failures, as the fault tests inject, never trip it
        healthy.record("http_503" if rng.random() < 0.2 else None)
    assert healthy.tripped is None

    recovering = Breaker(s, history=["connection"] * 10)  # the window crosses chunks
    for _ in range(10):
        recovering.record("timeout")
    assert recovering.tripped is not None
    never = Breaker(s.model_copy(update={"max_failure_share": None}), ["timeout"] * 50)
    assert never.tripped is None


def test_threshold_one_trips_only_when_every_request_failed() -> None:
    s = BreakerSettings(window=10, min_requests=10, max_failure_share=1.0)
    b = Breaker(s, history=["http_500"] * 9 + [""])
    assert b.tripped is None
    b.record("http_500")  # the success is still in the window
    assert b.tripped is None
    for _ in range(9):
        b.record("http_500")
    assert b.tripped is not None


@pytest.mark.slow
def test_a_dead_endpoint_stops_the_run_and_a_rerun_resumes(
    prefect_api: str, tmp_path: Path, write_config
) -> None:
    env = {**os.environ, "PREFECT_API_URL": prefect_api}
    out = tmp_path / "out"
    with FakeServer({"fail_after": 10}) as failing:
        cfg = fake_backend_config(failing.base_url, out, max_retries=1, max_concurrency=2)
        cfg["plan"].update({"limit": 60, "chunk_requests": 15})
        cfg["fill"] = {"documents": 60, "max_rounds": 4}
        cfg["generation"]["breaker"] = {"window": 20, "min_requests": 10}
        run = subprocess.run(
            [*BOOKSMITH, "run", "--config", str(write_config(cfg))],
            env=env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        attempts = failing.stats()["requests"]
    assert run.returncode == 3, run.stderr[-2000:]
    # below the progress bar, one line that says why and how to resume, and no traceback
    estimate, *progress, message = run.stderr.strip().splitlines()
    assert message.startswith("error: the endpoint failed"), run.stderr[-2000:]
    assert "run again with the same config and seed to resume" in message
    assert estimate.startswith("estimate: 60 requests, ")  # said before the first request
    assert all(line.startswith("generating") for line in progress), progress
    assert "Traceback" not in run.stderr
    assert list_versions(out) == []  # a failed night publishes nothing
    # it stopped at the window, not after every request of every fill round failed
    assert attempts <= 10 + 2 * (20 + 15), attempts

    # The endpoint is back (same model, so the same request ids): the answered ten come from
    # the cache, the rest are asked for now.
    with FakeServer() as healthy:
        cfg["generation"]["base_url"] = healthy.base_url
        rerun = subprocess.run(
            [*BOOKSMITH, "run", "--config", str(write_config(cfg, "again.yaml"))],
            env=env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        asked = healthy.stats()["requests"]
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    (version,) = list_versions(out)
    gen = read_manifest(version).counts.generate
    assert gen.cached == 10 and gen.failed == 0 and gen.breaker is None
    assert asked == gen.planned - 10


@pytest.mark.slow
def test_a_run_that_keeps_nothing_or_mostly_fails_is_not_published(
    prefect_api: str, tmp_path: Path, write_config
) -> None:
    """A finished run that kept no document, or whose endpoint failed most requests, exits 4
    with one line, publishes no version (the latest stays the last good one) and leaves its
    evidence, report included, under _state/failed/<run_id>/; `publish` sets the bar."""
    env = {**os.environ, "PREFECT_API_URL": prefect_api}
    out = tmp_path / "out"

    def run(faults: dict, name: str, **publish: object) -> subprocess.CompletedProcess[str]:
        with FakeServer(faults) as server:
            cfg = fake_backend_config(server.base_url, out / name, max_retries=1)
            cfg["plan"]["limit"] = 12
            cfg["fill"] = {"documents": None}
            cfg["generation"]["breaker"] = {"max_failure_share": None}
            cfg["publish"] = publish
            return subprocess.run(
                [*BOOKSMITH, "run", "--config", str(write_config(cfg, name))],
                env=env, capture_output=True, text=True, timeout=300,
            )  # fmt: skip

    empty = run({"truncated": 1.0}, "empty")  # every answer cut short: all rejected
    assert empty.returncode == 4, empty.stderr[-2000:]
    message = empty.stderr.strip().splitlines()[-1]
    assert message.startswith("error: run ") and "is not published: it kept 0 documents" in message
    assert "the filters rejected 12" in message and "Traceback" not in empty.stderr
    assert list_versions(out / "empty") == []
    (aside,) = (out / "empty" / "_state" / "failed").iterdir()
    assert f"are in {aside}" in message
    assert read_manifest(aside).counts.rejected == 12 and (aside / "report" / "report.md").exists()

    failing = run({"bad_request": 0.7}, "failing")
    assert failing.returncode == 4, failing.stderr[-2000:]
    gen_failed = failing.stderr.strip().splitlines()[-1]
    assert "requests failed" in gen_failed and "above publish.max_failed_share 50%" in gen_failed
    assert list_versions(out / "failing") == []

    tolerated = run({"bad_request": 0.7}, "tolerated", max_failed_share=None)
    assert tolerated.returncode == 0, tolerated.stderr[-2000:]
    (version,) = list_versions(out / "tolerated")
    assert read_manifest(version).counts.generate.failed > 6
