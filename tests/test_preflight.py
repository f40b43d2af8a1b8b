"""Preflight: a run that cannot work says why in seconds, every problem at once, one line
each naming the setting and the fix, before Prefect starts or anything is planned."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from booksmith.generation.preflight import preflight
from booksmith.schemas.config import RunConfig
from tests.conftest import fake_backend_config
from tests.fakeserver import FakeServer

BOOKSMITH = [sys.executable, "-m", "booksmith"]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_every_problem_is_one_line_before_anything_starts(tmp_path: Path, write_config) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    cfg = fake_backend_config(f"http://127.0.0.1:{_closed_port()}/v1", blocker / "out")
    cfg["dedup"] = {"index": "redis", "redis_url": f"redis://:secret@127.0.0.1:{_closed_port()}/0"}
    started = time.monotonic()
    run = subprocess.run(
        [*BOOKSMITH, "run", "--config", str(write_config(cfg))],
        env={k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"},
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 2, run.stderr[-2000:]
    assert time.monotonic() - started < 30  # no ephemeral Prefect server was started
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 3 and all(line.startswith("error: ") for line in lines), lines
    assert "generation.base_url: nothing answers at http://127.0.0.1:" in lines[0]
    assert "output.dir:" in lines[1] and "is a file, not a directory" in lines[1]
    assert "dedup.redis_url: Redis at redis://:***@127.0.0.1:" in lines[2]
    assert "secret" not in run.stderr and "Traceback" not in run.stderr
    assert not (blocker.parent / "out").exists()


def test_a_refused_key_and_a_model_the_server_does_not_serve(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("FAKE_KEY", "wrong")
    with FakeServer({"api_key": "right", "models": ["other-model"]}) as server:
        cfg = fake_backend_config(server.base_url, tmp_path / "out", api_key_env="FAKE_KEY")
        problems = preflight(RunConfig.model_validate(cfg))
        assert problems == [
            f"generation.api_key_env: {server.base_url} refused the key in $FAKE_KEY "
            "(HTTP 401); set a valid key"
        ]
        monkeypatch.setenv("FAKE_KEY", "right")
        problems = preflight(RunConfig.model_validate(cfg))
        assert problems == [
            f"generation.model: 'fake-model' is not served at {server.base_url} "
            "(it serves: other-model)"
        ]
        cfg["generation"]["model"] = "other-model"
        assert preflight(RunConfig.model_validate(cfg)) == []


def test_topics_expand_checks_before_it_asks(tmp_path: Path, write_config) -> None:
    """`topics expand` on a dead endpoint, writing under a file: both problems in one go, exit
    2 in seconds (no Prefect server started), no topic file, no traceback."""
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    dead = f"http://user:pw-planted@127.0.0.1:{_closed_port()}/v1"
    config = write_config(fake_backend_config(dead, tmp_path / "out"))
    started = time.monotonic()
    run = subprocess.run(
        [*BOOKSMITH, "topics", "expand", "Optics", "-o", str(blocker / "t.jsonl"),
         "--config", str(config)],
        env={k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"},
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 2, run.stderr[-2000:]
    assert time.monotonic() - started < 30
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 2 and all(line.startswith("error: ") for line in lines), lines
    assert "generation.base_url: nothing answers at http://user:***@127.0.0.1:" in lines[0]
    assert f"--output: {blocker} is a file, not a directory" in lines[1]
    assert "pw-planted" not in run.stderr and "Traceback" not in run.stderr
