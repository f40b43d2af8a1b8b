"""The generation client against a real HTTP server that injects faults."""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from booksmith.generation.breaker import Breaker
from booksmith.generation.cache import ResponseCache
from booksmith.generation.client import Endpoint, GenerationClient, retry_after_s
from booksmith.generation.ledger import GenerationReport
from booksmith.generation.limits import (
    MIN_ANSWERS,
    Limits,
    RateSeries,
    append_series,
    parse_reset,
)
from booksmith.schemas import GenerationRequest, Sampling
from booksmith.schemas.config import AdaptiveSettings, BreakerSettings, Budget, Price
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
    # each retry counted under its reason, as the server tallied the faults it injected
    faults = stats["faults"]
    by_reason = report.retry_reasons
    assert sum(by_reason.values()) == report.retries
    assert by_reason["http_429"] == faults["rate_limit"] > 0
    assert by_reason["http_500"] + by_reason["http_503"] == faults["server_error"] > 0
    assert by_reason["timeout"] == faults["timeout"] > 0
    assert by_reason["connection"] == faults["drop"] > 0


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


def test_a_taken_down_answer_leaves_no_bytes_in_the_cache_files(tmp_path: Path) -> None:
    """take_down deletes the answer and tombstones the request; the SQLite file and its WAL
    keep none of the text's bytes (free pages zeroed, the WAL folded in and truncated), while
    the other answers stay."""
    from booksmith.schemas import GenerationResult

    path = tmp_path / "cache.sqlite"
    texts = {f"r{i}": f"Document {i} says {'zebra quartz ' * 40}end {i}." for i in range(3)}
    cache = ResponseCache(path)
    for rid, text in texts.items():
        cache.put(GenerationResult(request_id=rid, text=text))
    other = ResponseCache(path)  # a run still open: its connection keeps the WAL file alive
    assert other.get("r1") is not None
    assert b"Document 1 says" in (tmp_path / "cache.sqlite-wal").read_bytes()
    assert cache.take_down(["r1"]) == 1
    files = b"".join(p.read_bytes() for p in tmp_path.iterdir())
    assert b"Document 1 says" not in files and b"Document 0 says" in files
    other.close()
    cache.close()
    again = ResponseCache(path)
    assert again.get("r1") is None and again.taken_down("r1") is not None
    assert again.get("r2") is not None and again.get("r2").text == texts["r2"]  # type: ignore[union-attr]
    again.close()


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


async def test_retry_reasons_reach_the_report(tmp_path: Path) -> None:
    """The client's retries by reason, through the manifest's counts, become the report's
    table of retries and failures by reason; a version written before the reasons were
    recorded shows its retries as not recorded."""
    from booksmith.flows.report import render_report
    from booksmith.schemas.manifest import GenerateCounts
    from booksmith.shards.files import write_json_atomically

    faults = {"rate_limit": 0.3, "retry_after_s": 0.01, "server_error": 0.3}
    with FakeServer(faults) as server:
        report = await GenerationClient(endpoint(server, max_retries=1)).run(requests(40))
    gen = GenerateCounts.model_validate(report.summary())
    assert gen.retry_reasons and sum(gen.retry_reasons.values()) == gen.retries
    manifest = {"run_id": "r1", "shards": [], "documents": 0, "counts": {"generate": {}}}
    manifest["counts"]["generate"] = gen.model_dump()
    write_json_atomically(tmp_path / "manifest.json", manifest)
    text = render_report(tmp_path).read_text()
    assert "### Retries and failures by reason" in text
    for reason in gen.retry_reasons.keys() | gen.failures.keys():
        row = f"| {reason} | {gen.retry_reasons.get(reason, 0)} | {gen.failures.get(reason, 0)} |"
        assert row in text
    manifest["counts"]["generate"] = {"retries": 5, "failures": {"http_400": 1}}
    write_json_atomically(tmp_path / "manifest.json", manifest)
    text = render_report(tmp_path).read_text()
    assert "| (reason not recorded) | 5 | 0 |" in text and "| http_400 | 0 | 1 |" in text


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


def spacing(arrivals: list[list[float]]) -> list[float]:
    times = sorted(t for t, status in arrivals if status == 200)
    return [b - a for a, b in itertools.pairwise(times)]


async def test_requests_are_delayed_by_the_rpm_limit() -> None:
    # 120 a minute is 2 a second; a second's worth (about 2) may go at once, the rest are
    # spaced. Without the limit all 12 arrive within a fraction of a second.
    with FakeServer({"record_arrivals": True}) as server:
        report = await GenerationClient(endpoint(server, rpm=120)).run(requests(12, tag="rpm"))
        arrivals = server.stats()["arrivals"]
    assert report.completed == 12 and len(arrivals) == 12
    gaps = spacing(arrivals)
    assert sum(gaps) >= 3.5, gaps  # 9 or 10 spaced requests at 0.5 s: about 4.5-5 s
    assert sorted(gaps)[len(gaps) // 2] >= 0.3, gaps  # the typical gap is the limit's


async def test_requests_are_delayed_by_the_tpm_limit() -> None:
    # Each request is estimated at its prompt (about 5 tokens) plus max_tokens 40 plus 4 per
    # message: about 50 tokens; 6,000 a minute is 100 a second, so about 2 requests a second.
    with FakeServer({"record_arrivals": True}) as server:
        client = GenerationClient(endpoint(server, tpm=6_000))
        report = await client.run(requests(10, max_tokens=40, tag="tpm"))
        arrivals = server.stats()["arrivals"]
    assert report.completed == 10 and len(arrivals) == 10
    gaps = spacing(arrivals)
    assert sum(gaps) >= 2.5, gaps  # 8 or 9 spaced requests at about 0.5 s: about 4 s
    assert sorted(gaps)[len(gaps) // 2] >= 0.25, gaps
    # the limit spends the tokens actually used too: nothing here used more than estimated
    assert report.prompt_tokens + report.completion_tokens <= 10 * 50


def strict_breaker() -> Breaker:
    # trips at 3 failures in 10 requests: a 429 counted as a failure would trip it at once
    return Breaker(BreakerSettings(window=10, min_requests=5, max_failure_share=0.3))


CHANGE_S = 3.0
LIMITS = [[0.0, 40.0], [CHANGE_S, 15.0]]  # the server's requests per second, then lower


async def converge(
    adaptive: AdaptiveSettings, n: int = 400
) -> tuple[GenerationReport, dict[str, Any]]:
    faults = {"rate_limit_schedule": LIMITS, "record_arrivals": True, "latency_s": 0.02}
    with FakeServer(faults) as server:
        client = GenerationClient(
            endpoint(server, max_retries=2, backoff_base_s=0.05, backoff_max_s=0.5, timeout_s=5),
            breaker=strict_breaker(),
            adaptive=adaptive,
        )
        report = await client.run(requests(n, max_tokens=16, tag="aimd"))
        return report, server.stats()


def refused_share(arrivals: list[list[float]], start: float) -> float:
    after = [status for t, status in arrivals if t >= start]
    return after.count(429) / len(after)


async def test_adaptive_limits_follow_a_server_limit_that_changes() -> None:
    """The server lets 40 requests a second through, then 15; the client (16 in flight, no
    rpm set) finds the first limit, comes down to the second, and stays at its edge with few
    429s (it probes the limit: about one a second here). Every 429 is retried without counting
    as a failure: the strict breaker never trips, and no request runs out of its 2 retries."""
    report, stats = await converge(AdaptiveSettings(interval_s=1.0))
    assert report.completed == 400 and report.failed == 0, report.failures
    assert report.breaker is None
    arrivals = stats["arrivals"]
    assert stats["faults"].get("server_rate_limit", 0) == report.rate_limited > 0
    # after the change: the step down (a second or two), then the edge of the new limit
    assert refused_share(arrivals, CHANGE_S) < 0.18, refused_share(arrivals, CHANGE_S)
    assert refused_share(arrivals, CHANGE_S + 3) < 0.1, refused_share(arrivals, CHANGE_S + 3)
    # the effective rate near the end (the last second, the run's tail, left out)
    end = max(t for t, _ in arrivals)
    late = [t for t, status in arrivals if status == 200 and end - 6 <= t < end - 1]
    assert 0.75 * 15 <= len(late) / 5 <= 15 * 1.05, len(late) / 5
    # the report's series: one point a second, 429s where the server answered them
    rate = report.rate
    assert 10 <= len(rate) <= 120
    assert sum(p["requests"] for p in rate) == report.requests
    assert sum(p["rate_limited"] for p in rate) == report.rate_limited
    assert all(p["limit_rpm"] is None or p["limit_rpm"] <= 60 * 45 for p in rate)
    assert 0.75 * 15 * 60 <= rate[-3]["limit_rpm"] <= 15 * 60 * 1.15, rate[-3:]
    assert report.summary()["rate"] == rate and report.summary()["rate_limited"] > 0


async def test_fixed_limits_against_the_same_server_are_often_refused() -> None:
    """The control: with adapting off, the same run keeps asking far more than the server lets
    through, and a large share of it is answered 429."""
    report, stats = await converge(AdaptiveSettings(enabled=False), n=200)
    assert refused_share(stats["arrivals"], CHANGE_S) > 0.3
    assert report.rate_limited > 0.3 * report.requests


async def test_a_rate_limit_that_never_lifts_ends_in_failures() -> None:
    """At the floor of the limits, 429s count again: requests fail after their retries and
    the breaker trips, in a bounded number of requests."""
    faults = {"rate_limit": 1.0, "transient_attempts": 1_000, "retry_after_s": 0.01}
    adaptive = AdaptiveSettings(min_requests_per_minute=1_200, rate_limit_retries=3)
    with FakeServer(faults) as server:
        client = GenerationClient(
            endpoint(server, max_concurrency=4, max_retries=1),
            breaker=strict_breaker(),
            adaptive=adaptive,
        )
        report = await client.run(requests(12, tag="never"))
        sent = server.stats()["requests"]
    assert report.completed == 0
    assert set(report.failures) == {"retries_exhausted:http_429"}
    assert report.breaker is not None and report.skipped_breaker > 0
    assert sent <= report.failed * (1 + 1 + 3)


def test_rate_limit_headers_pause_dispatch() -> None:
    limits = Limits(max_concurrency=4, rpm=None, tpm=None)
    limits.headers({"x-ratelimit-remaining-requests": "3", "x-ratelimit-reset-requests": "2s"})
    assert limits.paused_until == 0.0
    before = time.monotonic()
    limits.headers({"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "1.5s"})
    assert 1.4 <= limits.paused_until - before <= 1.6
    limits.headers({"x-ratelimit-remaining-tokens": "0", "x-ratelimit-reset-tokens": "6m0s"})
    assert limits.paused_until - before >= 359
    assert [parse_reset(v) for v in ("20ms", "1s", "6m0s", "1h2m3.5s", "0.25", "soon")] == [
        0.02,
        1.0,
        360.0,
        3723.5,
        0.25,
        None,
    ]


def overload(limits: Limits) -> None:
    """Answers that are all 429s, as many as a decrease needs."""
    sent = time.monotonic()
    for _ in range(MIN_ANSWERS):
        limits.rate_limited_answer(sent, None, None)


def test_scattered_429s_do_not_lower_the_limits() -> None:
    limits = Limits(max_concurrency=8, rpm=600, tpm=None)
    for k in range(2_000):  # one in ten answers a 429 (retried): under decrease_at_share
        sent = time.monotonic()
        limits.paced = True  # the rate is what holds requests back
        if k % 10 == 9:
            assert limits.rate_limited_answer(sent, 1.0, None)  # retried, not counted
        else:
            limits.succeeded(sent)
    # no decrease, no pause for everyone; the rate steps back a little now and then and grows
    # back: it is not worn down
    assert (limits.slots, limits.paused_until, limits.decreases) == (8, 0.0, 0)
    assert limits.rate is not None and 7.0 <= limits.rate <= 10.0, limits.rate
    overload(limits)
    # a sustained share comes down at once (no pause: no Retry-After given here)
    assert limits.decreases == 1 and limits.slots <= 5 and limits.paused_until == 0.0


def test_additive_increase_stays_under_the_ceilings() -> None:
    limits = Limits(max_concurrency=8, rpm=600, tpm=None, settings=AdaptiveSettings())
    overload(limits)
    # every answer refused: the first 429 steps back (x 0.9), then, once they are the most
    # answers, down twice the factor at once (0.7 x 0.7 of 8 slots, of 9 a second)
    assert limits.slots == 3 and limits.rate == pytest.approx(10 * 0.9 * 0.49)
    for _ in range(10_000):
        limits.paced = limits.saturated = True  # the limits hold requests back
        limits.succeeded(time.monotonic())
    assert limits.slots == 8 and limits.rate == pytest.approx(10.0)


def test_the_rate_series_stays_small() -> None:
    series = RateSeries(interval_s=1.0, max_points=8, start=0.0)
    for k in range(1, 100):
        series.sent = 5
        series.close_interval(float(k), 600.0, 4)
    assert len(series.points) <= 8
    assert sum(p["requests"] for p in series.points) == 5 * 99
    assert series.points[-1]["t_s"] == 99.0
    joined = append_series(series.points, series.points, offset_s=99.0, max_points=8)
    assert len(joined) <= 8 and sum(p["requests"] for p in joined) == 2 * 5 * 99


def test_a_later_client_starts_where_the_limits_ended() -> None:
    first = Limits(max_concurrency=8, rpm=600, tpm=None)
    overload(first)
    state = first.state()
    later = Limits(max_concurrency=8, rpm=600, tpm=None)
    later.resume(state)
    assert (later.slots, later.rate) == (first.slots, first.rate) == (3, pytest.approx(4.41))
    # within the ceilings whatever it is given; a client that does not adapt ignores it
    later.resume({"concurrency": 100.0, "rate": 1e6, "base_rate": 4.9})
    assert (later.slots, later.rate) == (8, 10.0)
    fixed = Limits(max_concurrency=8, rpm=600, tpm=None, settings=AdaptiveSettings(enabled=False))
    fixed.resume(state)
    assert (fixed.slots, fixed.rate) == (8, 10.0)


def test_the_run_joins_its_chunks_series_and_limits() -> None:
    from booksmith.generation.scaleout import merge_reports
    from booksmith.pipeline.chunks import add_report

    def chunk(requests: int, limited: int, elapsed: float, url: str) -> GenerationReport:
        series = RateSeries(interval_s=1.0, max_points=120, start=0.0)
        for k in range(1, int(elapsed) + 1):
            series.sent, series.limited = requests, limited
            series.close_interval(float(k), 600.0, 4)
        report = GenerationReport(requests=requests * int(elapsed), rate_limited=limited)
        report.elapsed_s, report.rate = elapsed, series.points
        report.limits = {url: {"concurrency": 4.0, "rate": 10.0, "base_rate": 10.0}}
        return report

    # two partitions side by side: their points summed
    both = merge_reports([chunk(5, 1, 3, "a"), chunk(7, 0, 3, "b")])
    assert [p["requests"] for p in both.rate] == [12, 12, 12]
    assert both.rate_limited == 1 and set(both.limits) == {"a", "b"}
    # chunks one after the other: the second's points after the first's, in run time
    run = GenerationReport()
    add_report(run, both)
    add_report(run, chunk(2, 2, 2, "a"))
    assert [p["t_s"] for p in run.rate] == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert sum(p["rate_limited"] for p in run.rate) == 3 + 4 and run.rate_limited == 3
    assert run.summary()["rate"] == run.rate and set(run.limits) == {"a", "b"}


async def test_rate_limit_headers_keep_requests_under_the_limit() -> None:
    """A server that says how many requests it has left (x-ratelimit-remaining-requests) and
    when that resets: the client waits for the reset at zero instead of meeting 429s."""
    faults = {
        "rate_limit_schedule": [[0.0, 10.0]],
        "rate_limit_headers": True,
        "record_arrivals": True,
        "latency_s": 0.02,
    }
    with FakeServer(faults) as server:
        client = GenerationClient(endpoint(server, max_concurrency=4), breaker=strict_breaker())
        report = await client.run(requests(50, max_tokens=16, tag="headers"))
        arrivals = server.stats()["arrivals"]
    assert report.completed == 50 and report.breaker is None
    assert refused_share(arrivals, 0.0) < 0.15, refused_share(arrivals, 0.0)
    # about 10 a second: 50 requests take 4 s or more
    assert max(t for t, _ in arrivals) >= 3.5
