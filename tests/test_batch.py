"""The Batch API backend: its files, and the client against a local files/batches server."""

from __future__ import annotations

import json
import logging
import os
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from openai.types import Batch, FileObject
from openai.types.chat.completion_create_params import CompletionCreateParamsNonStreaming
from pydantic import TypeAdapter

from booksmith.generation.batch import BatchGenerationClient, import_results, list_batches
from booksmith.generation.batch_files import (
    BatchFileError,
    chat_body,
    parse_output_line,
    read_custom_ids,
    validate_body,
    write_batch_files,
)
from booksmith.generation.cache import ResponseCache
from booksmith.generation.client import Endpoint, GenerationClient
from booksmith.schemas import GenerationRequest, Sampling
from booksmith.schemas.config import Budget
from tests.batchserver import BatchServer, completion

ROOT = Path(__file__).resolve().parents[1]
SECRET = "sk-test-never-written-0123456789"


def make_requests(n: int, tag: str = "", max_tokens: int = 32) -> list[GenerationRequest]:
    return [
        GenerationRequest.build(
            messages=[
                {"role": "system", "content": "You write textbooks."},
                {"role": "user", "content": f"Write about topic {tag}{i}."},
            ],
            model="fake-model",
            sampling=Sampling(max_tokens=max_tokens),
        )
        for i in range(n)
    ]


def endpoint(server: BatchServer, **kw: Any) -> Endpoint:
    base: dict[str, Any] = {
        "base_url": server.base_url,
        "model": "fake-model",
        "api_key": SECRET,
        "backend": "openai-batch",
        "max_retries": 2,
        "timeout_s": 10.0,
    }
    base.update(kw)
    return Endpoint(**base)


def client(server: BatchServer, tmp: Path, **kw: Any) -> BatchGenerationClient:
    kw.setdefault("cache", ResponseCache(tmp / "cache.sqlite"))
    kw.setdefault("state_dir", tmp / "batches")
    kw.setdefault("poll_interval_s", 0.05)
    kw.setdefault("run_id", "r1")
    return BatchGenerationClient(endpoint(server), **kw)


@pytest.fixture
def server() -> Iterator[BatchServer]:
    with BatchServer() as s:
        yield s


def get_json(server: BatchServer, path: str) -> dict[str, Any]:
    with urllib.request.urlopen(server.base_url + path, timeout=10) as resp:
        data: dict[str, Any] = json.loads(resp.read())
    return data


# -- files ------------------------------------------------------------------------------------


def test_files_split_at_the_line_and_byte_limits_and_every_line_validates(tmp_path: Path) -> None:
    reqs = make_requests(25)
    by_lines = write_batch_files(reqs, tmp_path / "a", max_requests=10)
    assert [len(f.custom_ids) for f in by_lines] == [10, 10, 5]

    line_bytes = max(len(json.dumps({"custom_id": r.id, "body": chat_body(r)})) for r in reqs)
    limit = 3 * (line_bytes + 80)  # room for about three lines, surely not four
    by_bytes = write_batch_files(reqs, tmp_path / "b", max_bytes=limit)
    assert len(by_bytes) > 1 and all(f.n_bytes <= limit for f in by_bytes)
    assert all(len(f.custom_ids) >= 3 for f in by_bytes[:-1])  # filled up, not one per file

    strict = TypeAdapter(CompletionCreateParamsNonStreaming)
    for files in (by_lines, by_bytes):
        assert [cid for f in files for cid in f.custom_ids] == [r.id for r in reqs]
        for f in files:
            assert f.path.stat().st_size == f.n_bytes
            assert read_custom_ids(f.path) == list(f.custom_ids)
            for raw in f.path.read_text().splitlines():
                line = json.loads(raw)
                assert set(line) == {"custom_id", "method", "url", "body"}
                assert (line["method"], line["url"]) == ("POST", "/v1/chat/completions")
                strict.validate_python(line["body"])
    assert not list(tmp_path.rglob("*.tmp"))  # written atomically


def test_an_invalid_body_is_rejected_with_a_clear_message(tmp_path: Path) -> None:
    body = chat_body(make_requests(1)[0])
    validate_body(body)
    with pytest.raises(BatchFileError, match=r"abc: .*logit_bias_typo: Extra inputs"):
        validate_body({**body, "logit_bias_typo": 1}, "abc")
    # messages are checked item by item (pydantic validates the SDK's Iterable lazily)
    no_content = {**body, "messages": [{"role": "user"}]}
    with pytest.raises(BatchFileError, match=r"messages\.0\..*content: Field required"):
        validate_body(no_content)
    with pytest.raises(BatchFileError, match="stream"):
        validate_body({**body, "stream": True})

    bad = GenerationRequest.build(
        messages=[{"role": "user", "content": "x"}],
        model="fake-model",
        sampling=Sampling(),
        response_format=json.dumps({"type": "not_a_format"}),
    )
    with pytest.raises(BatchFileError, match=f"request {bad.id}: .*response_format"):
        write_batch_files([bad], tmp_path)
    with pytest.raises(BatchFileError, match="over the 100-byte limit"):
        write_batch_files(make_requests(1), tmp_path, max_bytes=100)
    assert not list(tmp_path.iterdir())


async def test_batch_lines_carry_exactly_the_body_the_live_client_sends(
    server: BatchServer, tmp_path: Path
) -> None:
    reqs = make_requests(4)
    structured = GenerationRequest.build(
        messages=[{"role": "user", "content": "List three topics as JSON."}],
        model="fake-model",
        sampling=Sampling(max_tokens=16),
        response_format=json.dumps({"type": "json_object"}),
    )
    reqs.append(structured)
    report = await GenerationClient(endpoint(server)).run(reqs)
    assert report.completed == len(reqs)
    sent = sorted(server.live_bodies, key=lambda b: json.dumps(b, sort_keys=True))
    ours = sorted((chat_body(r) for r in reqs), key=lambda b: json.dumps(b, sort_keys=True))
    assert sent == ours


def test_output_lines_become_results_or_failures() -> None:
    ok_body = completion(chat_body(make_requests(1)[0]))

    def line(status: int | None, body: Any = None, error: Any = None) -> dict[str, Any]:
        response = (
            None if status is None else {"status_code": status, "request_id": "r", "body": body}
        )
        return {"id": "batch_req_1", "custom_id": "abc", "response": response, "error": error}

    ok = parse_output_line(line(200, ok_body), backend="b")
    assert ok.result.ok and ok.result.text == ok_body["choices"][0]["message"]["content"]
    assert ok.result.completion_tokens == ok_body["usage"]["completion_tokens"]
    cases = {
        "batch:http_400": (line(400, {"error": {"message": "bad"}}), True),
        "batch:http_429": (line(429, {}), False),
        "batch:http_500": (line(500, {}), False),
        "batch:batch_expired": (line(None, error={"code": "batch_expired"}), False),
        "batch:bad_response": (line(200, {"choices": "nope"}), False),
    }
    filtered = json.loads(json.dumps(ok_body))
    filtered["choices"][0]["finish_reason"] = "content_filter"
    cases["content_filter"] = (line(200, filtered), True)
    for reason, (raw, permanent) in cases.items():
        outcome = parse_output_line(json.dumps(raw), backend="b")
        assert (outcome.result.error, outcome.permanent) == (reason, permanent)


# -- against the server -----------------------------------------------------------------------


async def test_results_join_into_the_cache_and_a_second_run_submits_nothing(
    server: BatchServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    server.max_lines = 5  # the server fails any file the client did not split
    reqs = make_requests(12)
    cache = ResponseCache(tmp_path / "cache.sqlite")
    report = await client(server, tmp_path, cache=cache, max_requests_per_file=5).run(reqs)
    assert (report.completed, report.failed, report.cached) == (12, 0, 0)
    assert (server.files_created, server.batches_created) == (3, 3)
    assert {r.request_id for r in report.results} == {r.id for r in reqs}
    for req in reqs:  # joined by custom_id: each result is its own request's answer
        hit = cache.get(req.id)
        expected = completion(chat_body(req))
        assert hit is not None and hit.text == expected["choices"][0]["message"]["content"]
        assert hit.backend == "openai-batch" and hit.attempts == 1
    assert report.completion_tokens == sum(r.completion_tokens for r in report.results) > 0
    assert report.prompt_tokens > 0 and report.requests == 12

    records = list_batches(tmp_path / "batches")
    assert [(r.state, r.status, r.n_requests) for r in records] == [
        ("done", "completed", 5),
        ("done", "completed", 5),
        ("done", "completed", 2),
    ]
    for r in records:  # what the server said, read raw and checked against the SDK's types
        assert r.batch_id and r.input_file_id and r.output_file_id
        batch = Batch.model_validate(get_json(server, f"/batches/{r.batch_id}"))
        assert batch.status == "completed" and batch.input_file_id == r.input_file_id
        assert batch.request_counts is not None and batch.request_counts.completed == r.n_requests
        for file_id in (r.input_file_id, r.output_file_id):
            FileObject.model_validate(get_json(server, f"/files/{file_id}"))

    again = await client(server, tmp_path, cache=cache).run(reqs)
    assert (again.completed, again.cached, again.requests) == (12, 12, 0)
    assert (server.files_created, server.batches_created) == (3, 3)

    # the key is in no file and no log line
    assert SECRET not in caplog.text
    for path in tmp_path.rglob("*"):
        assert not path.is_file() or SECRET.encode() not in path.read_bytes(), path


_CHILD = """
import asyncio, sys
from pathlib import Path
from booksmith.generation.batch import BatchGenerationClient
from booksmith.generation.cache import ResponseCache
from booksmith.generation.client import Endpoint
from tests.test_batch import make_requests
base_url, tmp = sys.argv[1], Path(sys.argv[2])
ep = Endpoint(base_url=base_url, model="fake-model", api_key="x", backend="openai-batch")
client = BatchGenerationClient(
    ep, state_dir=tmp / "batches", cache=ResponseCache(tmp / "cache.sqlite"), run_id="r1",
    poll_interval_s=0.05,
)
asyncio.run(client.run(make_requests(6)))
"""


@pytest.mark.parametrize("killed", ["after_recording_the_batch", "before_recording_the_batch"])
async def test_a_killed_process_resumes_its_batch_without_resubmitting(
    server: BatchServer, tmp_path: Path, killed: str
) -> None:
    server.hold = True  # the batch stays in_progress while the first process dies
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-c", _CHILD, server.base_url, str(tmp_path)]
    child = subprocess.Popen(cmd, cwd=ROOT, env=env)
    try:
        deadline = time.monotonic() + 20
        while not any(r.batch_id for r in list_batches(tmp_path / "batches")):
            assert child.poll() is None, "the child exited early"
            assert time.monotonic() < deadline, "no batch was recorded"
            time.sleep(0.02)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert (server.files_created, server.batches_created) == (1, 1)
    if killed == "before_recording_the_batch":
        # As if the process died between batches.create and writing its id down.
        with sqlite3.connect(tmp_path / "batches" / "batches.sqlite") as db:
            db.execute("UPDATE batches SET state = 'uploaded', batch_id = NULL, status = NULL")

    server.hold = False
    report = await client(server, tmp_path).run(make_requests(6))
    assert (report.completed, report.failed, report.cached) == (6, 0, 0)
    assert (server.files_created, server.batches_created) == (1, 1)
    assert report.requests == 0  # nothing new was written or sent
    assert [r.state for r in list_batches(tmp_path / "batches")] == ["done"]


async def test_error_file_lines_400_are_permanent_and_500_are_retried(
    server: BatchServer, tmp_path: Path
) -> None:
    reqs = make_requests(8)
    ids = [r.id for r in reqs]
    server.line_errors = {ids[0]: 400, ids[1]: 400, ids[2]: 500, ids[3]: 503}
    cache = ResponseCache(tmp_path / "cache.sqlite")
    report = await client(server, tmp_path, cache=cache).run(reqs)
    assert (report.completed, report.failed) == (6, 2)
    assert report.failures == {"batch:http_400": 2}
    assert (report.requests, report.retries) == (10, 2)
    assert report.retry_reasons == {"batch:http_500": 1, "batch:http_503": 1}  # the report's table
    assert server.batches_created == 2  # the original, then one with the two 5xx lines
    assert server.processed[ids[2]] == server.processed[ids[3]] == 2
    hit = cache.get(ids[2])
    assert hit is not None and hit.attempts == 2
    failures = {rid: (reason, permanent) for rid, _, reason, permanent, _ in cache.failures()}
    assert failures == {ids[0]: ("batch:http_400", True), ids[1]: ("batch:http_400", True)}

    # permanent failures are not resubmitted by a later run
    again = await client(server, tmp_path, cache=cache).run(reqs)
    assert (again.completed, again.cached, again.failed, again.requests) == (6, 6, 2, 0)
    assert server.batches_created == 2


async def test_transient_errors_stop_after_max_retries(server: BatchServer, tmp_path: Path) -> None:
    reqs = make_requests(3)
    server.line_errors = {reqs[0].id: 500}
    server.transient_attempts = 99
    cache = ResponseCache(tmp_path / "cache.sqlite")
    report = await client(server, tmp_path, cache=cache).run(reqs)  # max_retries=2
    assert report.failures == {"retries_exhausted:batch:http_500": 1}
    assert server.processed[reqs[0].id] == 3 and server.batches_created == 3
    assert [(rid, permanent) for rid, _, _, permanent, _ in cache.failures()] == [
        (reqs[0].id, False)
    ]


async def test_an_expired_batch_keeps_its_results_and_resubmits_the_rest(
    server: BatchServer, tmp_path: Path
) -> None:
    reqs = make_requests(8)
    server.expire_next = 3  # the first batch answers three lines, then expires
    report = await client(server, tmp_path).run(reqs)
    assert (report.completed, report.failed) == (8, 0)
    assert server.batches_created == 2
    assert [server.processed[r.id] for r in reqs] == [1] * 8  # nothing answered twice
    records = list_batches(tmp_path / "batches")
    assert [(r.status, r.n_requests) for r in records] == [("expired", 8), ("completed", 5)]
    assert report.retries == 5 and report.retry_reasons == {"batch:batch_expired": 5}


async def test_the_budget_skips_requests_before_they_are_submitted_as_live_does(
    server: BatchServer, tmp_path: Path
) -> None:
    reqs = make_requests(10, max_tokens=100)
    budget = Budget(max_tokens=450)  # each request is estimated at over 100 tokens
    live = await GenerationClient(endpoint(server), budget=budget).run(reqs)
    report = await client(server, tmp_path, budget=budget).run(reqs)
    assert report.budget_exhausted and 0 < report.completed < 10
    assert (report.completed, report.skipped_budget) == (live.completed, live.skipped_budget)
    assert report.completion_tokens == live.completion_tokens
    (record,) = list_batches(tmp_path / "batches")
    assert record.n_requests == report.requests == report.completed


async def test_an_output_file_made_elsewhere_joins_the_same_cache(
    server: BatchServer, tmp_path: Path
) -> None:
    """The offline path: our input file, run by vLLM's run_batch on a GPU box, its output
    imported; a later run finds everything in the cache."""
    reqs = make_requests(3)
    (batch_file,) = write_batch_files(reqs, tmp_path / "export")
    out_lines = []
    for raw in batch_file.path.read_text().splitlines():
        line = json.loads(raw)
        response = {"status_code": 200, "request_id": "r", "body": completion(line["body"])}
        if line["custom_id"] == reqs[2].id:
            response = {"status_code": 400, "request_id": "r", "body": {"error": {}}}
        out_lines.append({"id": "x", "custom_id": line["custom_id"], "response": response})
    output = tmp_path / "vllm-output.jsonl"
    output.write_text("".join(json.dumps(o) + "\n" for o in out_lines))

    cache = ResponseCache(tmp_path / "cache.sqlite")
    counts = import_results(output, cache, backend="vllm-batch", run_id="r1")
    assert counts == {"completed": 2, "batch:http_400": 1}
    report = await client(server, tmp_path, cache=cache).run(reqs)
    assert (report.cached, report.failed, report.requests) == (2, 1, 0)
    assert server.batches_created == 0


async def test_a_request_no_server_would_accept_fails_alone(
    server: BatchServer, tmp_path: Path
) -> None:
    bad = GenerationRequest.build(
        messages=[{"role": "user", "content": "x"}],
        model="fake-model",
        sampling=Sampling(),
        response_format=json.dumps({"type": "not_a_format"}),
    )
    cache = ResponseCache(tmp_path / "cache.sqlite")
    reqs = [*make_requests(2), bad]
    report = await client(server, tmp_path, cache=cache, keep_files=False).run(reqs)
    assert (report.completed, report.failures) == (2, {"batch:invalid_request": 1})
    assert [(rid, permanent) for rid, _, _, permanent, _ in cache.failures()] == [(bad.id, True)]
    assert not list((tmp_path / "batches" / "files").iterdir())  # keep_files=False
