"""Where a flow's submitted tasks run: Prefect's thread pool, or Dask (`runner: dask`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, TypeVar

from prefect import Flow
from prefect.context import FlowRunContext

from booksmith.schemas.config import RunConfig

if TYPE_CHECKING:
    from distributed import Client

F = TypeVar("F", bound=Flow[Any, Any])


def with_runner(flow: F, cfg: RunConfig) -> F:
    """`flow` with the task runner the config asks for. On Dask, the generation partitions run
    on the cluster's workers, and so do the quality chain's slices of a large chunk (the flow
    hands the stage `dask_client()`); the other stages stay in the flow's process (they are
    cheap next to generation, and the dataset is written in one place)."""
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


def dask_client() -> Client | None:
    """The Dask client of the flow run in progress when its task runner is Dask (the cluster
    its tasks are submitted to), else None. Call it from the flow's own code."""
    ctx = FlowRunContext.get()
    runner = ctx.task_runner if ctx is not None else None
    if runner is None:
        return None
    from prefect_dask import DaskTaskRunner

    return runner.client if isinstance(runner, DaskTaskRunner) else None
