"""Generation in a process of its own (generation/process.py): the same answers as in the
flow's thread, its progress forwarded to the flow's listeners, and no orphan left asking the
endpoint when the run dies."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psutil

from booksmith.generation import progress
from booksmith.generation.backends import open_endpoints
from booksmith.generation.ledger import GenerationReport
from booksmith.generation.plan import plan_for
from booksmith.generation.process import GenerationCall, GenerationProcess, generate_chunk
from booksmith.generation.seeds import load_seeds
from booksmith.schemas.config import RunConfig
from tests.conftest import fake_backend_config
from tests.fakeserver import FakeServer


def _cfg(base_url: str, out: Path, n: int) -> RunConfig:
    cfg = fake_backend_config(base_url, out)
    cfg["plan"]["limit"] = n
    return RunConfig.model_validate(cfg)


def _plan(cfg: RunConfig) -> list[Any]:
    seeds = load_seeds(cfg.topics)
    return list(plan_for(cfg, seeds, 3, samples_per_topic=1, limit=cfg.plan.limit))


def _answers(report: GenerationReport) -> list[tuple[str, str | None]]:
    return sorted((r.request_id, r.text) for r in report.results)


def test_a_chunk_generated_in_its_own_process_equals_one_generated_in_the_thread(
    tmp_path: Path,
) -> None:
    events: list[tuple[str, int, int]] = []

    def listen(event: str, data: dict[str, Any]) -> None:
        if event == "generation":
            report = data["report"]
            events.append((threading.current_thread().name, id(report), report.completed))

    with FakeServer({"latency_s": 0.02}) as server:
        here = _cfg(server.base_url, tmp_path / "here", 24)
        there = _cfg(server.base_url, tmp_path / "there", 24)
        plan = _plan(here)
        assert len(plan) == 24
        with open_endpoints(here.generation, here.embedded) as (endpoint,):
            call = GenerationCall(plan, endpoint, here, "r", here.generation.budget)
            in_thread = generate_chunk(call, None)
            unsubscribe = progress.subscribe(listen)
            try:
                with GenerationProcess() as process:
                    (pid,) = process.pids()
                    child = psutil.Process(pid)
                    cpu_before = sum(child.cpu_times()[:2])
                    in_child = process.run(dataclasses.replace(call, cfg=there))
                    cpu_after = sum(child.cpu_times()[:2])
            finally:
                unsubscribe()

    assert pid != os.getpid()
    assert cpu_after > cpu_before  # the child did the work
    assert in_child.completed == in_thread.completed == 24
    assert _answers(in_child) == _answers(in_thread)
    assert in_child.summary()["completion_tokens"] == in_thread.summary()["completion_tokens"]
    # Progress came through the queue's thread, one report object for the call, and the last
    # event (sent before `run` returned) counts every answer.
    assert events, "no progress forwarded"
    assert {name for name, _, _ in events} == {"booksmith-generation-progress"}
    assert len({ident for _, ident, _ in events}) == 1
    assert events[-1][2] == 24


ORPHAN = """
import sys, time
from pathlib import Path
from booksmith.generation.backends import open_endpoints
from booksmith.generation.process import GenerationCall, GenerationProcess
from tests.test_generation_process import _cfg, _plan

cfg = _cfg(sys.argv[1], Path(sys.argv[2]), 8)
plan = _plan(cfg)
with open_endpoints(cfg.generation, cfg.embedded) as (endpoint,):
    process = GenerationProcess()
    print(*process.pids(), flush=True)
    process.run(GenerationCall(plan, endpoint, cfg, "r", cfg.generation.budget))  # killed here
"""


def test_a_generation_process_dies_with_its_run(tmp_path: Path) -> None:
    # Every answer takes 3 s: when the run is killed, its child is waiting on eight of them.
    with FakeServer({"latency_s": 3.0}) as server:
        run = subprocess.Popen(
            [sys.executable, "-c", ORPHAN, server.base_url, str(tmp_path / "out")],
            stdout=subprocess.PIPE,
            text=True,
            cwd=Path(__file__).parent.parent,
        )
        assert run.stdout is not None
        (pid,) = map(int, run.stdout.readline().split())
        deadline = time.monotonic() + 30
        while server.stats()["requests"] < 8:  # the child is asking
            assert time.monotonic() < deadline, "the child never asked"
            time.sleep(0.05)
        run.send_signal(signal.SIGKILL)
        run.wait(timeout=10)
        killed_at = time.monotonic()
        while psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
            assert time.monotonic() - killed_at < 1.5, "the generation process outlived its run"
            time.sleep(0.02)
