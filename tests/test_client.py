"""The generation client against a real HTTP server that injects faults."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from booksmith.generation.cache import ResponseCache
from booksmith.generation.client import Endpoint, GenerationClient, retry_after_s
from booksmith.schemas import GenerationRequest, Sampling
from booksmith.schemas.config import Budget, Price
from tests.fakeserver import FakeServer


def requests(n: int, max_tokens: int = 32, tag: str = "") -> list[GenerationRequest]:
    return [
        GenerationRequest.build(
            messages=[{"role": "user", "content": f"Write about topic {tag}{i}."}],
            model="fake-model",
            sampling=Sampling(max_tokens=max_tokens),
        )
        for i in range(n)
    ]


def endpoint(server: FakeServer, **kw: object) -> Endpoint:
    base = {
        "base_url": server.base_url,
        "model": "fake-model",
        "max_concurrency": 16,
        "timeout_s": 1.0,
        "max_retries": 4,
        "backoff_base_s": 0.01,
        "backoff_max_s": 0.05,
    }
    base.update(kw)
    return Endpoint(**base)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def faulty() -> Iterator[FakeServer]:
    faults = {
        "rate_limit": 0.1,
        "retry_after_s": 0.05,
        "server_error": 0.1,
        "timeout": 0.05,
        "timeout_s": 3.0,
        "drop": 0.05,
        "truncated": 0.1,
        "empty": 0.05,
        "bad_request": 0.05,
        "content_filter": 0.05,
    }
    with FakeServer(faults) as server:
        yield server


async def test_every_request_ends_as_a_document_or_a_recorded_failure(
    faulty: FakeServer, tmp_path: Path
) -> None:
    faulty.reset()
    reqs = requests(120)
    cache = ResponseCache(tmp_path / "cache.sqlite")
    report = await GenerationClient(endpoint(faulty), cache=cache, run_id="r1").run(reqs)
    assert report.planned == 120
    assert report.completed + report.failed + report.skipped_budget == 120
    assert {r.request_id for r in report.results} == {r.id for r in reqs}
    # transient faults (429, 5xx, timeout, dropped connection) were retried to success
    assert report.retries > 0
    assert set(report.failures) <= {"http_400", "content_filter"}, report.failures
    assert report.failed == sum(report.failures.values()) > 0
    assert report.truncated > 0 and report.empty > 0
    truncated = [r for r in report.results if r.truncated]
    assert all(r.finish_reason == "length" for r in truncated)
    # failures are in the failures table with their reason, and marked permanent
    recorded = {rid: (reason, permanent) for rid, _, reason, permanent, _ in cache.failures()}
    assert len(recorded) == report.failed
    assert all(permanent for _, permanent in recorded.values())
    stats = faulty.stats()
    assert stats["requests"] == report.requests
    assert report.requests == 120 + report.retries
    assert len(cache) == report.completed


async def test_rerun_requests_nothing_that_finished(faulty: FakeServer, tmp_path: Path) -> None:
    faulty.reset()
    reqs = requests(40, tag="rerun")
    cache = ResponseCache(tmp_path / "cache.sqlite")
    first = await GenerationClient(endpoint(faulty), cache=cache, run_id="r1").run(reqs)
    before = faulty.stats()["requests"]
    second = await GenerationClient(endpoint(faulty), cache=cache, run_id="r2").run(reqs)
    assert faulty.stats()["requests"] == before, "a rerun requested something again"
    assert second.cached == first.completed and second.requests == 0
    assert {r.request_id: r.text for r in second.results if r.ok} == {
        r.request_id: r.text for r in first.results if r.ok
    }
    # permanent failures are not retried unless asked
    assert second.failed == first.failed
    third = await GenerationClient(
        endpoint(faulty), cache=cache, run_id="r3", retry_failed=True
    ).run(reqs)
    assert third.requests >= first.failed


async def test_sample_indexes_get_distinct_seeds_and_texts(tmp_path: Path) -> None:
    msgs = [{"role": "user", "content": "Explain fractions."}]
    reqs = [
        GenerationRequest.build(
            messages=msgs, model="fake-model", sampling=Sampling(), sample_index=i
        )
        for i in range(4)
    ]
    assert len({r.id for r in reqs}) == 4 and len({r.sampling.seed for r in reqs}) == 4
    with FakeServer() as server:
        report = await GenerationClient(endpoint(server)).run(reqs)
    assert len({r.text for r in report.results}) == 4


async def test_retries_give_up_and_record_the_reason(tmp_path: Path) -> None:
    with FakeServer({"server_error": 1.0, "transient_attempts": 100}) as server:
        cache = ResponseCache(tmp_path / "c.sqlite")
        report = await GenerationClient(
            endpoint(server, max_retries=2), cache=cache, run_id="r"
        ).run(requests(3))
        assert server.stats()["requests"] == 9  # 3 requests x (1 + 2 retries), never forever
    assert report.failed == 3 == sum(report.failures.values())
    assert set(report.failures) <= {"retries_exhausted:http_500", "retries_exhausted:http_503"}
    failures = list(cache.failures())
    assert len(failures) == 3
    assert all(f[2].startswith("retries_exhausted:http_5") for f in failures)
    assert [(f[3], f[4]) for f in failures] == [(False, 3)] * 3  # transient, 3 attempts


async def test_retry_after_is_honoured(tmp_path: Path) -> None:
    with FakeServer({"rate_limit": 1.0, "retry_after_s": 0.4}) as server:
        report = await GenerationClient(endpoint(server)).run(requests(2))
    assert report.completed == 2 and report.retries == 2
    # each request waited at least the 0.4 s the server asked for before its second attempt
    assert all(r.latency_s >= 0.4 for r in report.results)


def test_retry_after_parsing() -> None:
    class Resp:
        def __init__(self, headers: dict[str, str]) -> None:
            self.headers = headers

    class Exc(Exception):
        def __init__(self, headers: dict[str, str]) -> None:
            self.response = Resp(headers)

    assert retry_after_s(Exc({"retry-after": "3"})) == 3.0
    assert retry_after_s(Exc({"retry-after-ms": "250"})) == 0.25
    assert retry_after_s(Exc({})) is None
    assert retry_after_s(ValueError()) is None
    assert retry_after_s(Exc({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"})) == 0.0


async def test_budget_stops_cleanly_and_keeps_what_was_generated(tmp_path: Path) -> None:
    reqs = requests(30, max_tokens=50)
    with FakeServer() as server:
        client = GenerationClient(
            endpoint(server, max_concurrency=2),
            cache=ResponseCache(tmp_path / "c.sqlite"),
            budget=Budget(max_tokens=600),
        )
        report = await client.run(reqs)
    assert report.budget_exhausted
    assert 0 < report.completed < 30
    assert report.completed + report.failed + report.skipped_budget == 30
    assert report.prompt_tokens + report.completion_tokens <= 600


async def test_cost_accounting_and_dollar_budget(tmp_path: Path) -> None:
    prices = {"fake-model": Price(prompt_per_million=1000.0, completion_per_million=2000.0)}
    with FakeServer() as server:
        report = await GenerationClient(endpoint(server), prices=prices).run(requests(5))
        expected = (report.prompt_tokens * 1000 + report.completion_tokens * 2000) / 1e6
        assert report.cost_usd == pytest.approx(expected) and report.cost_usd > 0
        capped = await GenerationClient(
            endpoint(server, max_concurrency=1),
            prices=prices,
            budget=Budget(max_cost_usd=expected / 2),
        ).run(requests(5, tag="b"))
    assert capped.budget_exhausted and capped.cost_usd <= expected / 2


async def test_rate_limits_are_applied(tmp_path: Path) -> None:
    # 30 requests at most per minute with a burst of 30: all 10 pass; the limiter saw them all.
    with FakeServer() as server:
        client = GenerationClient(endpoint(server, rpm=30, tpm=100_000))
        report = await client.run(requests(10))
    assert report.completed == 10
    # the bucket holds the 10 requests, less what leaked (30 a minute) since they were counted
    assert client._rpm is not None
    leaked = 30 / 60 * (report.elapsed_s + 0.5)
    assert 10 - leaked <= client._rpm._level <= 10
    assert client._tpm is not None and client._tpm._level > 10 * 32
