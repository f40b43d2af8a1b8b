"""Where a flow's submitted tasks run: Prefect's thread pool, or Dask (`runner: dask`)."""

from __future__ import annotations

from typing import Any, TypeVar

from prefect import Flow

from booksmith.schemas.config import RunConfig

F = TypeVar("F", bound=Flow[Any, Any])


def with_runner(flow: F, cfg: RunConfig) -> F:
    """`flow` with the task runner the config asks for. On Dask, the generation partitions run
    on the cluster's workers; the other stages stay in the flow's process (they are cheap next
    to generation, and the dataset is written in one place)."""
    if cfg.runner != "dask":
        return flow
    from prefect_dask import DaskTaskRunner

    if cfg.dask.address:
        runner = DaskTaskRunner(address=cfg.dask.address)
    else:
        runner = DaskTaskRunner(
            cluster_kwargs={
                "n_workers": cfg.dask.n_workers,
                "threads_per_worker": cfg.dask.threads_per_worker,
                "processes": True,
                "dashboard_address": None,  # no web UI port per run
            }
        )
    return flow.with_options(task_runner=runner)  # type: ignore[arg-type,return-value]
