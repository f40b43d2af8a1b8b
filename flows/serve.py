"""`booksmith serve`: every booksmith flow as a deployment, served from this process.

The one-machine way to run booksmith every night (Prefect's `flow.serve`): no work pool, no
worker; this process polls the Prefect server for due runs and executes them. The compose stack
runs the same flows through prefect.yaml and a worker instead (docs/operations.md).

Deployments: `nightly` (on the config's cron, default 02:00 UTC, one run at a time), and
`expand-topics`, `export`, `train` for ad-hoc runs from the UI or `prefect deployment run`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect.deployments.runner import RunnerDeployment
from prefect.schedules import Cron

from booksmith.schemas.config import RunConfig


def deployments(
    config: Path | None, cfg: RunConfig, schedule: bool = True
) -> list[RunnerDeployment]:
    from booksmith.flows.expand import expand_topics
    from booksmith.flows.export import export_flow
    from booksmith.flows.nightly import nightly
    from booksmith.flows.runners import with_runner
    from booksmith.flows.train import train_flow

    params: dict[str, Any] = {"config": str(config.resolve())} if config else {}
    nightly_schedule = [Cron(cfg.schedule.cron, timezone=cfg.schedule.timezone)] if schedule else []
    made = [
        with_runner(nightly, cfg).to_deployment(
            "nightly",
            schedules=nightly_schedule,
            parameters=params,
            concurrency_limit=1,  # two runs at once would race for the same output directory
            description="One dataset version from the configured topics; dedups against every "
            "earlier version.",
        ),
        expand_topics.to_deployment(
            "expand-topics",
            parameters=params,
            description="Grow seed topics into a topic tree file (pass topics and output).",
        ),
        export_flow.to_deployment(
            "export",
            description="Copy a version (or the newest under an output directory) to a URL.",
        ),
        train_flow.to_deployment(
            "train",
            description="Train the bundled Phi model on a dataset version.",
        ),
    ]
    # to_deployment returns a coroutine only when called from async code, never here.
    assert all(isinstance(d, RunnerDeployment) for d in made)
    return [d for d in made if isinstance(d, RunnerDeployment)]


def serve(
    config: Path | None, cfg: RunConfig, schedule: bool = True, limit: int | None = None
) -> None:
    from prefect import serve as prefect_serve

    prefect_serve(*deployments(config, cfg, schedule), limit=limit)
