"""`booksmith serve`: every booksmith flow as a deployment, served from this process.

The one-machine way to run booksmith every night (Prefect's `flow.serve`): no work pool, no
worker; this process polls the Prefect server for due runs and executes them. The compose stack
runs the same flows through prefect.yaml and a worker instead (docs/operations.md).

Deployments (flows/deployments.py, the one table prefect.yaml also follows): `nightly` (on
the config's cron, default 02:00 UTC, one run at a time), and `expand-topics`, `export`,
`train` for ad-hoc runs from the UI or `prefect deployment run`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect.deployments.runner import RunnerDeployment
from prefect.schedules import Cron

from booksmith.flows.deployments import DEPLOYMENTS
from booksmith.schemas.config import RunConfig


def deployments(
    config: Path | None, cfg: RunConfig, schedule: bool = True
) -> list[RunnerDeployment]:
    """Every deployment of flows/deployments.py, for this config."""
    from booksmith.flows.task_runners import with_runner

    params: dict[str, Any] = {"config": str(config.resolve())} if config else {}
    made = []
    for d in DEPLOYMENTS:
        options: dict[str, Any] = {"description": d.description}
        if d.takes_config:
            options["parameters"] = params
        if d.nightly:
            cron = Cron(cfg.schedule.cron, timezone=cfg.schedule.timezone)
            options["schedules"] = [cron] if schedule else []
            options["concurrency_limit"] = 1  # two runs at once would race for one output dir
        flow = with_runner(d.flow(), cfg) if d.nightly else d.flow()
        made.append(flow.to_deployment(d.name, **options))
    # to_deployment returns a coroutine only when called from async code, never here.
    assert all(isinstance(d, RunnerDeployment) for d in made)
    return [d for d in made if isinstance(d, RunnerDeployment)]


def serve(
    config: Path | None, cfg: RunConfig, schedule: bool = True, limit: int | None = None
) -> None:
    from prefect import serve as prefect_serve

    prefect_serve(*deployments(config, cfg, schedule), limit=limit)
