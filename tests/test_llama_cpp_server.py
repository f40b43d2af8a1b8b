"""booksmith against a server no one here wrote (issue 15 point 11): llama-cpp-python's own
OpenAI-compatible server (`python -m llama_cpp.server`, its `[server]` extra's dependencies in
the dev group), serving the bundled SmolLM2-135M GGUF under an alias, with an API key.

What it answers differently from tests/fakeserver.py and the embedded server, and what each
test pins down:
- a model name it does not serve is answered anyway, by its one model, under the name asked
  for: only its /v1/models tells, so preflight is the guard;
- a path without /v1 is FastAPI's 404 `{"detail": "Not Found"}`, not an OpenAI error body;
- a prompt longer than its context is a 400 with code `context_length_exceeded`;
- OpenAI's `response_format: {"type": "json_schema"}` is a 500 (`internal_server_error`)
  carrying a validation error (it takes only `text` and `json_object`), not a 400.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from booksmith.generation.cache import ResponseCache
from booksmith.generation.client import RESPONSE_FORMAT_REJECTED, Endpoint, GenerationClient
from booksmith.generation.preflight import preflight
from booksmith.generation.seeds import load_seeds
from booksmith.generation.topics import RELEVANCE_FORMAT
from booksmith.schemas import GenerationRequest, Sampling
from booksmith.schemas.config import RunConfig
from booksmith.shards.bundled import bundled_gguf
from booksmith.shards.version_dir import list_versions, read_manifest
from tests.conftest import fake_backend_config
from tests.services import _http_ok, _process, _wait, free_port

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

ALIAS = "smollm2"
KEY_ENV = "BOOKSMITH_TEST_LLAMA_KEY"
N_CTX = 512  # booksmith's generation prompts are about 180 tokens with the chat template


class LlamaServer:
    def __init__(self, base_url: str, key: str) -> None:
        self.base_url = base_url  # .../v1
        self.key = key

    @property
    def root(self) -> str:
        return self.base_url.removesuffix("/v1")

    def config(self, out: Path, base_url: str | None = None, **generation: Any) -> dict[str, Any]:
        """A run config for this server: one request at a time (it serves them so), the
        timeout of a real generation on two cores, few retries."""
        gen = {
            "model": ALIAS,
            "api_key_env": KEY_ENV,
            "max_concurrency": 2,
            "timeout_s": 120.0,
            "max_retries": 1,
            "sampling": {"max_tokens": 64},
            **generation,
        }
        return fake_backend_config(base_url or self.base_url, out, **gen)


@pytest.fixture(scope="module")
def llama() -> Iterator[LlamaServer]:
    """`python -m llama_cpp.server` on a free loopback port, started once for this module."""
    port, key = free_port(), secrets.token_hex(8)
    cmd = [
        sys.executable, "-m", "llama_cpp.server",
        "--model", str(bundled_gguf()), "--model_alias", ALIAS, "--n_ctx", str(N_CTX),
        "--host", "127.0.0.1", "--port", str(port), "--api_key", key, "--verbose", "false",
    ]  # fmt: skip
    with _process(cmd) as proc:
        # /docs needs no key: it answers once the model is loaded and uvicorn listens
        _wait(_http_ok(f"http://127.0.0.1:{port}/docs"), proc, "llama_cpp.server", 120)
        os.environ[KEY_ENV] = key
        try:
            yield LlamaServer(f"http://127.0.0.1:{port}/v1", key)
        finally:
            os.environ.pop(KEY_ENV, None)


def _booksmith(*args: str, api: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PREFECT_API_URL": api}
    return subprocess.run(
        [sys.executable, "-m", "booksmith", *args],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip


# -- (1) preflight -------------------------------------------------------------------------------


def test_preflight_reads_its_answers(llama: LlamaServer, tmp_path: Path, monkeypatch) -> None:
    cfg = llama.config(tmp_path / "out")
    assert preflight(RunConfig.model_validate(cfg)) == []

    wrong_model = llama.config(tmp_path / "out", model="no-such-model")
    assert preflight(RunConfig.model_validate(wrong_model)) == [
        f"generation.model: 'no-such-model' is not served at {llama.base_url} (it serves: {ALIAS})"
    ]

    # without /v1: FastAPI's {"detail": "Not Found"} for /models and /chat/completions
    no_v1 = llama.config(tmp_path / "out", base_url=llama.root)
    assert preflight(RunConfig.model_validate(no_v1)) == [
        f"generation.base_url: {llama.root} has no OpenAI-compatible API at this path "
        "(/models and /chat/completions answer 404); check the path: such servers serve "
        "under /v1, e.g. http://host:8000/v1"
    ]

    monkeypatch.setenv(KEY_ENV, "not-the-key")
    assert preflight(RunConfig.model_validate(cfg)) == [
        f"generation.api_key_env: {llama.base_url} refused the key in ${KEY_ENV} "
        "(HTTP 401); set a valid key"
    ]


def test_a_run_for_a_model_it_does_not_serve_stops_at_preflight(
    llama: LlamaServer, tmp_path: Path, write_config
) -> None:
    """The server itself would answer it (see below): `booksmith run` must not start."""
    out = tmp_path / "out"
    config = write_config(llama.config(out, model="no-such-model"))
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    run = subprocess.run(
        [sys.executable, "-m", "booksmith", "run", "--config", str(config)],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 2, run.stderr[-2000:]
    assert run.stderr.strip().splitlines() == [
        f"error: generation.model: 'no-such-model' is not served at {llama.base_url} "
        f"(it serves: {ALIAS})"
    ]
    assert not out.exists()


# -- (2) a small generation through `booksmith run` --------------------------------------------


def test_a_small_run_writes_a_version(
    llama: LlamaServer, prefect_api: str, tmp_path: Path, write_config
) -> None:
    out = tmp_path / "out"
    cfg = llama.config(out)
    cfg["plan"] = {"limit": 3}
    cfg["publish"] = {"min_documents": 0}  # 64 tokens are too short for the default filters
    run = _booksmith("run", "--config", str(write_config(cfg)), api=prefect_api)
    assert run.returncode == 0, run.stderr[-3000:]
    (version,) = list_versions(out)
    manifest = read_manifest(version)
    gen = manifest.counts.generate
    assert (gen.planned, gen.completed, gen.failed) == (3, 3, 0)
    assert 3 <= gen.completion_tokens <= 3 * 64 and gen.prompt_tokens > 3 * 100
    rows = pq.read_table(version / "text").to_pylist()
    rows += pq.read_table(version / "rejected").to_pylist()
    assert len(rows) == 3 == manifest.documents + manifest.counts.rejected
    for row in rows:
        assert (row["backend"], row["model"]) == ("openai", ALIAS)
        assert row["finish_reason"] in ("stop", "length") and len(row["text"].split()) >= 3


# -- (3) the client's error paths against it ---------------------------------------------------


def _request(content: str, model: str = ALIAS, **kw: Any) -> GenerationRequest:
    return GenerationRequest.build(
        messages=[{"role": "user", "content": content}],
        model=model,
        sampling=Sampling(max_tokens=8, temperature=0.0),
        **kw,
    )


async def test_the_clients_error_paths(llama: LlamaServer, tmp_path: Path) -> None:
    endpoint = Endpoint(
        base_url=llama.base_url, model=ALIAS, api_key=llama.key, max_concurrency=1,
        timeout_s=120.0, max_retries=2, backoff_base_s=0.01, backoff_max_s=0.05,
    )  # fmt: skip
    too_long = _request("word " * (N_CTX + 100))
    structured = _request(
        "Is optics part of physics? Answer yes or no.",
        response_format=json.dumps(RELEVANCE_FORMAT),
    )
    unknown_model = _request("Say hello.", model="no-such-model")
    fine = _request("Say hello.")
    cache = ResponseCache(tmp_path / "cache.sqlite")
    try:
        client = GenerationClient(endpoint, cache=cache, run_id="llama")
        report = await client.run([too_long, structured, unknown_model, fine])
    finally:
        cache.close()
    results = {r.request_id: r for r in report.results}
    assert (report.planned, report.completed, report.failed) == (4, 2, 2)
    # a prompt over its context: a 400 whose code says why, final at the first answer
    assert results[too_long.id].error == "http_400:context_length_exceeded"
    assert results[too_long.id].attempts == 1
    # json_schema is a 500 there: a rejection of the format (the caller may ask without
    # it), not a server fault to retry
    assert results[structured.id].error == RESPONSE_FORMAT_REJECTED
    assert results[structured.id].attempts == 1
    assert report.failures == {"http_400:context_length_exceeded": 1, RESPONSE_FORMAT_REJECTED: 1}
    assert report.retries == 0
    # a model it does not serve is answered by the one it does, under the name asked for:
    # nothing in the answer tells, which is why preflight checks /v1/models first
    assert results[unknown_model.id].ok and results[unknown_model.id].model == "no-such-model"
    assert results[fine.id].ok and results[fine.id].model == ALIAS
    assert results[fine.id].completion_tokens > 0


# -- (4) structured output: `booksmith topics expand` ------------------------------------------


def _table(stderr: str) -> dict[str, str]:
    """The rows of the summary table `topics expand` prints."""
    rows = re.findall(r"^\W*(\w+)\s+│\s+(.*?)\s*│\s*$", stderr, re.MULTILINE)
    return dict(rows)


def test_topics_expand_falls_back_to_plain_text(
    llama: LlamaServer, prefect_api: str, tmp_path: Path, write_config
) -> None:
    """It refuses the json_schema format (a 500): every structured question is asked again
    without it, counted as a fallback, and answered."""
    cfg = llama.config(tmp_path / "out")
    cfg["expansion"] = {"sampling": {"max_tokens": 64, "temperature": 0.3}}
    topics = tmp_path / "topics.jsonl"
    run = _booksmith(
        "topics", "expand", "Optics", "--depth", "1", "--breadth", "3",
        "-o", str(topics), "--config", str(write_config(cfg)),
        api=prefect_api,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    counts = {k: int(v) for k, v in _table(run.stderr).items() if v.isdigit()}
    # the subtopics question was refused for its format, asked again plainly and answered:
    # no failure (before the client read that 500 as a rejection it was retried, then failed)
    assert counts["answers_failed"] == 0 and counts["structured_fallbacks"] >= 1, counts
    assert counts["requests"] >= 1 + counts["structured_fallbacks"], counts
    # its plain answer is parsed or counted as unparsed (the 135M model often writes a
    # JSON object of its own shape, not a list)
    assert counts["proposed"] > 0 or counts["answers_unparsed"] == 1, counts
    seeds = load_seeds(topics)
    assert seeds[0].topic == "Optics" and len(seeds) == counts["topics_written"]
    assert all(s.path == ["Optics"] for s in seeds[1:])
