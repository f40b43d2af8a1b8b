"""API keys come only from the environment or Prefect Secret blocks and never reach an output.

A key planted in the environment of a real `booksmith run` (against a fault-injecting server,
so retries, permanent errors and the failures table all run) is searched for, raw and
base64-encoded, in every file the run wrote, its stdout and stderr, the Prefect server's flow
run, task runs, logs and artifacts (and its whole database), PREFECT_HOME, and
`booksmith config show`. (tests/test_backends.py covers the Prefect Secret variant.)
"""

from __future__ import annotations

import asyncio
import base64
import os
import secrets
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from booksmith.flows.cli import app
from booksmith.shards.version_dir import STATE_DIR, list_versions, read_manifest
from tests.conftest import fake_backend_config
from tests.fakeserver import FakeApp, FaultConfig
from tests.services import redis_server

BOOKSMITH = [sys.executable, "-m", "booksmith"]
runner = CliRunner()


# -- what to look for ---------------------------------------------------------------------


def needles(secret: str) -> dict[str, bytes]:
    """The secret, and its base64 forms (standard and URL-safe) at each of the three byte
    offsets it can start at inside a longer encoded blob: the characters that depend on the
    secret's bytes alone."""
    raw = secret.encode()
    found = {"raw": raw}
    for offset in range(3):
        encoded = base64.b64encode(b"\0" * offset + raw)
        first = -(-8 * offset // 6)  # ceil: the first character made only of secret bits
        last = (8 * (offset + len(raw))) // 6  # the characters before it are whole
        stable = encoded[first:last]
        found[f"base64@{offset}"] = stable
        found[f"base64url@{offset}"] = stable.replace(b"+", b"-").replace(b"/", b"_")
    return found


def leaks(data: bytes | str, secret: str) -> list[str]:
    blob = data.encode("utf-8", "surrogateescape") if isinstance(data, str) else data
    return [name for name, needle in needles(secret).items() if needle in blob]


def test_needles_find_the_key_raw_and_encoded_anywhere() -> None:
    secret = "sk-booksmith-planted-" + secrets.token_hex(16)
    for prefix in (b"", b"x", b"xy", b"Bearer "):
        blob = b"header " + base64.b64encode(prefix + secret.encode()) + b" trailer"
        assert leaks(blob, secret), prefix
        assert leaks(base64.urlsafe_b64encode(prefix + secret.encode()), secret), prefix
    assert leaks(f"key={secret}!", secret) == ["raw"]
    assert leaks(b"sk-booksmith-planted-" + b"0" * 32, secret) == []


def files_with(root: Path, secret: str) -> dict[str, list[str]]:
    """Every file under `root` (bytes, recursively) that holds the secret in some form."""
    hits: dict[str, list[str]] = {}
    for path in sorted(root.rglob("*")):
        if not path.is_file() or path.is_symlink():
            continue
        if found := leaks(path.read_bytes(), secret):
            hits[str(path.relative_to(root))] = found
    return hits


# -- a fake OpenAI server that also records the Authorization header ----------------------


class KeyRecordingApp(FakeApp):
    """tests/fakeserver.py's app (same answers and faults), plus the Authorization header of
    every chat completion request, to prove the key was really sent."""

    def __init__(self, faults: dict[str, Any]) -> None:
        super().__init__(FaultConfig.from_dict(faults), models=None)
        self.authorization: Counter[str] = Counter()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] == "/v1/chat/completions":
            headers = dict(scope["headers"])
            self.authorization[headers.get(b"authorization", b"").decode("latin-1")] += 1
        await super().__call__(scope, receive, send)


@contextmanager
def recording_server(faults: dict[str, Any]) -> Iterator[tuple[KeyRecordingApp, str]]:
    import uvicorn

    app_ = KeyRecordingApp(faults)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        app_, loop="asyncio", lifespan="off", access_log=False, log_level="warning"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the fake server did not start"
        time.sleep(0.02)
    try:
        yield app_, f"http://127.0.0.1:{port}/v1"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


# -- what the Prefect server holds about a flow run ----------------------------------------


async def prefect_records(config: Path) -> dict[str, Any]:
    """The flow run whose `config` parameter is `config`, with its task runs, logs and
    artifacts, as JSON text per kind."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        FlowFilter,
        FlowFilterName,
        FlowRunFilter,
        FlowRunFilterId,
        LogFilter,
        LogFilterFlowRunId,
    )

    async with get_client() as client:
        runs = await client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=["booksmith-nightly"]))
        )
        ours = [r for r in runs if r.parameters.get("config") == str(config)]
        assert len(ours) == 1, [r.parameters for r in runs]
        run = ours[0]
        ids = [run.id]
        task_runs = await client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=ids))
        )
        logs = await client.read_logs(
            log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=ids)), limit=200
        )
        artifacts = await client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=ids))
        )
    return {
        "flow_run": run.model_dump_json(),
        "task_runs": [t.model_dump_json() for t in task_runs],
        "logs": [log.model_dump_json() for log in logs],
        "artifacts": [a.model_dump_json() for a in artifacts],
    }


def prefect_database() -> Path | None:
    """The test server's SQLite file (prefect_test_harness puts it in a temporary dir)."""
    from prefect.settings import PREFECT_SERVER_DATABASE_CONNECTION_URL

    url = str(PREFECT_SERVER_DATABASE_CONNECTION_URL.value() or "")
    prefix = "sqlite+aiosqlite:///"
    return Path(url[len(prefix) :]) if url.startswith(prefix) else None


# -- the run --------------------------------------------------------------------------------

FAULTS = {
    "rate_limit": 0.15,  # 429, retried after Retry-After
    "server_error": 0.15,  # 500/503, retried
    "bad_request": 0.15,  # 400: permanent, into the failures table
    "content_filter": 0.1,  # permanent too
    "truncated": 0.1,  # a document the filters reject
    "retry_after_s": 0.05,
    "latency_s": 0.01,
}


@pytest.mark.slow
def test_key_from_the_environment_never_reaches_any_output(
    prefect_api: str,
    tmp_path: Path,
    write_config,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    planted = "sk-booksmith-planted-" + secrets.token_hex(16)
    # credentials in URLs: the shared index's Redis password (used for real), and a password
    # and a key in the URL of a judge the config records but this run does not call (an S3
    # URL's keys are redacted by the same rules: test_redact.py)
    redis_password = "rpw-planted-" + secrets.token_hex(8)
    url_secret = "urlpw-planted-" + secrets.token_hex(8)
    key_in_query = "urlkey-planted-" + secrets.token_hex(8)
    url_secrets = (redis_password, url_secret, key_in_query)
    out = tmp_path / "out"
    prefect_home = tmp_path / "prefect-home"
    env = {
        **os.environ,
        "OPENAI_API_KEY": planted,
        "PREFECT_API_URL": prefect_api,
        "PREFECT_HOME": str(prefect_home),
        # Everything Prefect would write where we can search it: logs at DEBUG, sent to the
        # server; task results persisted under PREFECT_HOME.
        "PREFECT_LOGGING_LEVEL": "DEBUG",
        "PREFECT_LOGGING_TO_API_ENABLED": "true",
        "PREFECT_RESULTS_PERSIST_BY_DEFAULT": "true",
    }
    env.pop("BOOKSMITH_CRASH_AT", None)

    with (
        recording_server(FAULTS) as (server, base_url),
        redis_server(password=redis_password) as redis_url,
    ):
        cfg = fake_backend_config(base_url, out, max_retries=3, max_concurrency=4)
        cfg["plan"]["limit"] = 16
        cfg["dedup"] = {"index": "redis", "redis_url": redis_url}
        judge = f"https://judge:{url_secret}@judge.test/v1?api_key={key_in_query}"
        cfg["filters"] = {"annotate": {"base_url": judge}}
        config = write_config(cfg)
        run = subprocess.run(
            [*BOOKSMITH, "run", "--config", str(config), "--verbose"],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert run.returncode == 0, run.stderr[-3000:]
        stats = server.stats.as_dict()
        authorization = dict(server.authorization)

    # The key was really used: every request carried it, and the error paths ran.
    assert authorization == {f"Bearer {planted}": stats["requests"]}, list(authorization)
    for kind in ("rate_limit", "server_error", "bad_request", "content_filter"):
        assert stats["faults"].get(kind, 0) > 0, stats["faults"]
    (version,) = list_versions(out)
    gen = read_manifest(version).counts.generate
    assert gen.retries > 0 and gen.failed > 0, gen
    assert pq.read_table(version / "failures.parquet").num_rows == gen.failed
    with closing(sqlite3.connect(out / STATE_DIR / "responses.sqlite")) as db:
        assert db.execute("SELECT count(*) FROM failures").fetchone()[0] == gen.failed

    # Every file the run wrote: shards, manifest, card, report and plots, the response cache
    # and failures table (with its -wal), the dedup index.
    written = [p for p in out.rglob("*") if p.is_file()]
    assert any(p.suffix == ".parquet" for p in written) and any(
        p.name.startswith("responses.sqlite") for p in written
    )
    # The run used the passworded Redis (preflight and the index would have failed without it).
    assert read_manifest(version).config["dedup"]["redis_url"].startswith("redis://:***@")
    every = (planted, *url_secrets)
    for secret in every:
        assert files_with(out, secret) == {}, secret

    # What the process printed, and its Prefect settings directory.
    for secret in every:
        assert leaks(run.stdout, secret) == [] and leaks(run.stderr, secret) == [], secret
        assert files_with(prefect_home, secret) == {}, secret

    # What the Prefect server holds about the run: the flow run and its parameters, the task
    # runs, the logs (sent at DEBUG) and the artifacts (report, failures table, progress).
    records = asyncio.run(prefect_records(config))
    assert records["logs"] and len(records["artifacts"]) >= 2, records["artifacts"]
    assert any("failures" in a for a in records["artifacts"])
    for kind, items in records.items():
        for item in items if isinstance(items, list) else [items]:
            for secret in every:
                assert leaks(item, secret) == [], (kind, item[:500])
    database = prefect_database()
    assert database is not None and database.exists(), database
    for path in database.parent.glob(database.name + "*"):  # the db, -wal, -shm
        for secret in every:
            assert leaks(path.read_bytes(), secret) == [], path

    # `booksmith config show` with the key in the environment prints the variable's name only.
    monkeypatch.setenv("OPENAI_API_KEY", planted)
    shown = runner.invoke(app, ["config", "show", str(config)])
    assert shown.exit_code == 0, shown.output
    assert "OPENAI_API_KEY" in shown.output
    for secret in every:
        assert leaks(shown.output, secret) == [], secret


# -- a key in the config file is refused -------------------------------------------------


def test_a_key_in_the_config_file_is_rejected_without_echoing_it(tmp_path: Path) -> None:
    planted = "sk-booksmith-planted-" + secrets.token_hex(16)
    config = tmp_path / "c.yaml"
    config.write_text(
        "generation:\n"
        "  backend: openai\n"
        "  base_url: http://127.0.0.1:9/v1\n"
        "  model: m\n"
        f"  api_key: {planted}\n"
    )
    out = tmp_path / "out"
    for args in (
        ["run", "--config", str(config), "--out", str(out)],
        ["config", "show", str(config)],
    ):
        result = runner.invoke(app, args)
        assert result.exit_code == 2, (args, result.output)
        assert f"{config}:5: generation.api_key: unknown key" in result.output, result.output
        assert leaks(result.output, planted) == [], result.output
    assert not out.exists()


def test_a_key_pasted_into_api_key_env_is_rejected_without_echoing_it(tmp_path: Path) -> None:
    from booksmith.schemas.config import ConfigError, load_config

    planted = "sk-booksmith-planted-" + secrets.token_hex(16)
    config = tmp_path / "c.yaml"
    config.write_text(
        "generation:\n"
        "  backend: openai\n"
        "  base_url: http://127.0.0.1:9/v1\n"
        "  model: m\n"
        f"  api_key_env: {planted}\n"
    )
    shown = runner.invoke(app, ["config", "show", str(config)])
    assert leaks(shown.output, planted) == [], "config show prints the key"
    with pytest.raises(ConfigError, match=r"generation\.api_key_env") as err:
        load_config(config)
    assert leaks(str(err.value), planted) == []
    assert shown.exit_code == 2


def test_a_secret_is_hidden_by_what_it_holds_not_by_a_word_in_its_key(tmp_path: Path) -> None:
    """A bad `max_tokens` (a number setting whose name says "token") shows the bad value, so
    the user can see the mistake; a key-like value is hidden wherever it was pasted, and a
    setting named for a credential never echoes its value."""
    from booksmith.schemas.config import ConfigError, load_config

    config = tmp_path / "c.yaml"
    config.write_text("generation:\n  sampling:\n    max_tokens: lots\n")
    with pytest.raises(ConfigError) as err:
        load_config(config)
    assert "generation.sampling.max_tokens" in str(err.value) and "'lots'" in str(err.value)

    planted = "ghp_" + secrets.token_hex(18)
    config.write_text(f"plan:\n  system_prompt: 12\n  seed_words: {planted}\n")
    with pytest.raises(ConfigError) as err:
        load_config(config)
    assert "plan.seed_words" in str(err.value) and leaks(str(err.value), planted) == []
    assert "value not shown" in str(err.value)
