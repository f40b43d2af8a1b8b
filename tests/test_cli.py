"""The `booksmith` command: bad input fails in one line naming the file and key and writes
nothing; a run killed with SIGKILL and started again requests nothing twice."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from booksmith.flows.cli import app
from booksmith.schemas import GenerationRequest, Message, Sampling
from booksmith.shards.version_dir import list_versions, read_manifest
from tests.conftest import fake_backend_config
from tests.fakeserver import FakeServer, request_key

runner = CliRunner()
BOOKSMITH = [sys.executable, "-m", "booksmith"]


def test_unknown_config_key_names_file_line_and_key(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("seed: 1\ngeneration:\n  max_concurency: 4\n")
    result = runner.invoke(app, ["run", "--config", str(config), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert f"{config}:3: generation.max_concurency: unknown key" in result.output
    assert not (tmp_path / "o").exists()


def test_wrong_type_names_the_key_and_expectation(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("generation:\n  sampling:\n    temperature: hot\n")
    result = runner.invoke(app, ["run", "--config", str(config)])
    assert result.exit_code == 2
    assert "generation.sampling.temperature" in result.output
    assert "valid number" in result.output


def test_bad_topics_file_fails_before_anything_is_written(tmp_path: Path) -> None:
    topics = tmp_path / "t.jsonl"
    topics.write_text('{"topic": "ok"}\n{"topic": "{{ secrets }}"}\n')
    out = tmp_path / "o"
    result = runner.invoke(app, ["run", "--topics", str(topics), "--out", str(out)])
    assert result.exit_code == 2
    assert f"{topics}:2:" in result.output and "template syntax" in result.output
    assert not out.exists()


def test_plan_previews_without_generating_and_rejects_bad_input(tmp_path: Path) -> None:
    out = tmp_path / "plan.parquet"
    args = ["plan", "--seed", "3", "--limit", "10", "--show", "2", "-o", str(out)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    rows = pq.read_table(out).to_pylist()
    assert len(rows) == 10 and len({r["id"] for r in rows}) == 10
    for row in rows[:2]:  # the first prompts are printed whole
        prompt = row["messages"][-1]["content"]
        assert prompt.splitlines()[-1] in result.output
    config = tmp_path / "c.yaml"
    config.write_text("plan:\n  samples_per_topik: 2\n")
    bad = runner.invoke(app, ["plan", "--config", str(config), "-o", str(tmp_path / "x.parquet")])
    assert bad.exit_code == 2 and f"{config}:2: plan.samples_per_topik" in bad.output
    assert not (tmp_path / "x.parquet").exists()


def test_config_show_prints_every_default() -> None:
    result = runner.invoke(app, ["config", "show"])
    assert result.exit_code == 0
    for key in ("generation:", "max_concurrency:", "embedded:", "n_parallel:", "output:"):
        assert key in result.output


def test_topics_show_prints_the_tree() -> None:
    from booksmith.generation.seeds import default_seeds_path

    result = runner.invoke(app, ["topics", "show", str(default_seeds_path())])
    assert result.exit_code == 0
    assert "Mathematics" in result.output and "The Pythagorean theorem" in result.output


def _server_key(row: dict) -> str:
    req = GenerationRequest(**{**row, "messages": [Message(**m) for m in row["messages"]]})
    s: Sampling = req.sampling
    body = {
        "model": req.model,
        "messages": [m.model_dump() for m in req.messages],
        "max_tokens": s.max_tokens,
        "temperature": s.temperature,
        "top_p": s.top_p,
        "seed": s.seed,
    }
    return request_key(body)


@pytest.mark.slow
def test_sigkill_during_generation_then_rerun(
    prefect_api: str, tmp_path: Path, write_config
) -> None:
    out = tmp_path / "out"
    env = {**os.environ, "PREFECT_API_URL": prefect_api}
    with FakeServer({"latency_s": 0.25, "rate_limit": 0.1, "retry_after_s": 0.05}) as server:
        cfg = fake_backend_config(server.base_url, out, max_concurrency=2)
        cfg["plan"]["limit"] = 24
        config = write_config(cfg)
        cache_db = out / "_state" / "responses.sqlite"

        proc = subprocess.Popen(
            [*BOOKSMITH, "run", "--config", str(config)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        deadline = time.monotonic() + 120
        done_at_kill: set[str] = set()
        while time.monotonic() < deadline:
            try:
                with sqlite3.connect(cache_db) as db:
                    n = db.execute("SELECT count(*) FROM responses").fetchone()[0]
            except sqlite3.OperationalError:  # not created yet
                n = 0
            if n >= 6:
                break
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        assert list_versions(out) == [], "a killed run must not leave a dataset"
        with sqlite3.connect(cache_db) as db:
            done_at_kill = {r[0] for r in db.execute("SELECT request_id FROM responses")}
        assert 6 <= len(done_at_kill) < 24
        attempts_at_kill = server.stats()["by_key"]

        rerun = subprocess.run(
            [*BOOKSMITH, "run", "--config", str(config)], env=env, capture_output=True, text=True
        )
        assert rerun.returncode == 0, rerun.stderr
        (version,) = list_versions(out)
        assert rerun.stdout.strip().endswith(str(version))
        stats = server.stats()

    plan = pq.read_table(version / "plan.parquet").to_pylist()
    assert len(plan) == 24
    keys = {row["id"]: _server_key(row) for row in plan}
    for rid in done_at_kill:  # finished before the kill: never requested again
        assert stats["by_key"][keys[rid]] == attempts_at_kill[keys[rid]], rid
    assert all(stats["completed_by_key"].get(k, 0) >= 1 for k in keys.values())
    ids = pq.read_table(version / "text").column("id").to_pylist()
    assert len(ids) == len(set(ids)) == 24, "every document exactly once"
    gen = read_manifest(version).counts.generate
    assert gen.cached == len(done_at_kill) and gen.completed == 24


@pytest.mark.slow
def test_run_shows_progress_with_the_failures_it_counted(
    prefect_api: str, tmp_path: Path, write_config
) -> None:
    """The progress bar ends at every planned request, with the failures the manifest counts."""
    out = tmp_path / "out"
    with FakeServer({"bad_request": 0.25}) as server:
        config = write_config(fake_backend_config(server.base_url, out))
        run = subprocess.run(
            [*BOOKSMITH, "run", "--config", str(config)],
            env={**os.environ, "PREFECT_API_URL": prefect_api}, capture_output=True, text=True,
        )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    (version,) = list_versions(out)
    gen = read_manifest(version).counts.generate
    assert gen.failed > 0
    (last,) = [line for line in run.stderr.splitlines() if line.startswith("generating")][-1:]
    assert f" {gen.planned}/{gen.planned} " in last and f"failures {gen.failed} " in last, last


def test_debug_shows_the_traceback_behind_the_error_line(tmp_path: Path) -> None:
    """An error is one line and exit 2; --debug (or BOOKSMITH_DEBUG=1) adds the traceback
    above that same line. --help names the exit codes."""
    missing = str(tmp_path / "missing.yaml")
    env = {k: v for k, v in os.environ.items() if k != "BOOKSMITH_DEBUG"}
    plain = subprocess.run([*BOOKSMITH, "config", "show", missing], env=env,
                           capture_output=True, text=True, timeout=60)  # fmt: skip
    debug = subprocess.run([*BOOKSMITH, "--debug", "config", "show", missing], env=env,
                           capture_output=True, text=True, timeout=60)  # fmt: skip
    by_env = subprocess.run([*BOOKSMITH, "config", "show", missing], capture_output=True,
                            env={**env, "BOOKSMITH_DEBUG": "1"}, text=True, timeout=60)  # fmt: skip
    line = f"error: {missing}: config file not found"
    assert plain.returncode == debug.returncode == by_env.returncode == 2
    assert plain.stderr.strip() == line
    for run in (debug, by_env):
        assert "Traceback" in run.stderr and "ConfigError" in run.stderr, run.stderr
        assert run.stderr.strip().splitlines()[-1] == line
    shown = subprocess.run([*BOOKSMITH, "--help"], capture_output=True, text=True, timeout=60)
    assert "Exit codes: 0 done" in " ".join(shown.stdout.split())


def test_commands_given_the_wrong_kind_of_path_point_the_way(tmp_path: Path) -> None:
    """An output root where a version is needed lists its versions and names the newest; a
    missing path says it is missing; `datasets list` on a version says what it takes."""
    from tests.test_shards_dataset import make_version

    out = tmp_path / "out"
    for run_id in ("20261201T020000Z", "20261202T020000Z"):
        make_version(out / run_id, 5)
    newest = out / "20261202T020000Z"
    root = runner.invoke(app, ["report", str(out)])
    assert root.exit_code == 2
    assert root.output.strip() == (
        f"error: {out} is an output directory, not a dataset version (20261201T020000Z, "
        f"20261202T020000Z); give a version, e.g. {newest}"
    )
    missing = runner.invoke(app, ["verify", str(tmp_path / "nope")])
    assert missing.exit_code == 2, missing.output
    assert f"{tmp_path / 'nope'}: no such file or directory" in missing.output
    listed = runner.invoke(app, ["datasets", "list", str(newest)])
    assert listed.exit_code == 2 and "is a dataset version; datasets list takes the output" in (
        " ".join(listed.output.split())
    )
    empty = tmp_path / "new-out"
    empty.mkdir()
    nothing = runner.invoke(app, ["datasets", "list", str(empty)])
    assert nothing.exit_code == 0 and "no dataset versions yet" in " ".join(nothing.output.split())
    assert runner.invoke(app, ["report", str(newest)]).exit_code == 0
