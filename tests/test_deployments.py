"""Deployments: prefect.yaml names real flows with valid parameters, and `booksmith serve`
serves them on a real Prefect server, which then runs the nightly flow on request."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from prefect.exceptions import ObjectNotFound
from prefect.flows import load_flow_from_entrypoint

from booksmith.shards.version_dir import list_versions
from tests.conftest import fake_backend_config
from tests.fakeserver import FakeServer

ROOT = Path(__file__).resolve().parents[1]


def test_prefect_yaml_deploys_every_flow_with_valid_parameters() -> None:
    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    by_name = {d["name"]: d for d in spec["deployments"]}
    assert set(by_name) == {"nightly", "expand-topics", "export", "train"}
    for name, d in by_name.items():
        flow = load_flow_from_entrypoint(str(ROOT / d["entrypoint"]), use_placeholder_flow=False)
        accepted = inspect.signature(flow.fn).parameters
        assert set(d.get("parameters", {})) <= set(accepted), name
        assert d["work_pool"]["name"] == "booksmith"
    (nightly_schedule,) = by_name["nightly"]["schedules"]
    assert nightly_schedule == {"cron": "0 2 * * *", "timezone": "UTC"}


def test_prefect_yaml_says_what_the_deployment_table_says() -> None:
    """One definition: `booksmith serve` serves flows/deployments.py's table, and prefect.yaml
    (which a worker deploys) must name the same flows, descriptions, config and schedule."""
    from booksmith.flows.deployments import DEPLOYMENTS
    from booksmith.schemas.config import ScheduleSettings

    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    default = ScheduleSettings()
    table = {
        d.name: {
            "entrypoint": d.entrypoint,
            "description": d.description,
            "config": d.takes_config,
            "schedules": [{"cron": default.cron, "timezone": default.timezone}]
            if d.nightly
            else [],
            "concurrency_limit": 1 if d.nightly else None,
        }
        for d in DEPLOYMENTS
    }
    yaml_side = {
        d["name"]: {
            "entrypoint": d["entrypoint"],
            "description": d["description"],
            "config": "config" in d.get("parameters", {}),
            "schedules": d.get("schedules", []),
            "concurrency_limit": d.get("concurrency_limit"),
        }
        for d in spec["deployments"]
    }
    assert yaml_side == table


async def _deployments(names: list[str]) -> dict[str, object]:
    from prefect.client.orchestration import get_client

    found = {}
    async with get_client() as client:
        for name in names:
            with contextlib.suppress(ObjectNotFound):  # not registered yet
                found[name] = await client.read_deployment_by_name(name)
    return found


@pytest.mark.slow
def test_serve_registers_the_deployments_and_runs_nightly(
    prefect_api: str, tmp_path: Path, write_config
) -> None:
    from prefect.deployments import run_deployment

    out = tmp_path / "out"
    names = [
        "booksmith-nightly/nightly",
        "booksmith-expand-topics/expand-topics",
        "booksmith-export/export",
        "booksmith-train/train",
    ]
    with FakeServer() as server:
        cfg = fake_backend_config(server.base_url, out)
        cfg["plan"]["limit"] = 4
        cfg["schedule"] = {"cron": "30 3 * * *", "timezone": "Europe/Paris"}
        config = write_config(cfg)
        env = {**os.environ, "PREFECT_API_URL": prefect_api, "PREFECT_RUNNER_POLL_FREQUENCY": "1"}
        proc = subprocess.Popen(
            [sys.executable, "-m", "booksmith", "serve", "--config", str(config)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        try:
            deadline = time.monotonic() + 120
            found: dict[str, object] = {}
            while time.monotonic() < deadline and len(found) < len(names):
                assert proc.poll() is None, proc.communicate()[1].decode()[-3000:]
                found = asyncio.run(_deployments(names))
                time.sleep(0.5)
            assert set(found) == set(names)
            nightly = found["booksmith-nightly/nightly"]
            (sched,) = nightly.schedules  # type: ignore[attr-defined]
            assert sched.schedule.cron == "30 3 * * *" and sched.schedule.timezone == "Europe/Paris"
            assert nightly.parameters == {"config": str(config.resolve())}  # type: ignore[attr-defined]

            # An ad-hoc run of the served deployment, as the UI's "Run" button makes it.
            run = run_deployment("booksmith-nightly/nightly", timeout=180)
            assert run.state is not None and run.state.is_completed(), run.state  # type: ignore[union-attr]
            (version,) = list_versions(out)
            assert (version / "manifest.json").is_file()
        finally:
            os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
