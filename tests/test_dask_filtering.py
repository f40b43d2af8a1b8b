"""The quality chain on a Dask cluster: slices run in the cluster's worker processes (not the
flow's), each worker builds the chain once per run, and the verdicts and counts are the ones
the chain gives in one process."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from distributed import Client, LocalCluster

from booksmith.filters import run_chain
from booksmith.filters.quality import train
from booksmith.filters.records_io import read_labelled
from booksmith.pipeline import stages
from booksmith.pipeline.stages import QualityStage, StageOutput, dask_chain_tokens
from booksmith.schemas import Document
from booksmith.schemas.filter_settings import DecontamSettings, FilterSettings
from tests.conftest import fake_backend_config
from tests.fakeserver import FakeServer, completion_text
from tests.filters_helpers import LABELLED, MMLU, TEXTBOOK, make_doc


@pytest.fixture(scope="module")
def client() -> Iterator[Client]:
    with (
        LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
        ) as cluster,
        Client(cluster) as c,
    ):
        yield c


@pytest.fixture(scope="module")
def state(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A state directory with a trained quality model (the chain loads it from there)."""
    state = tmp_path_factory.mktemp("dask") / "_state"
    data, _ = read_labelled(LABELLED)
    train(data, state / "quality")
    return state


def _docs(n: int) -> list[Document]:
    """Kept documents and every kind of reject: empty, repetition, contaminated, low quality."""
    question = json.loads(MMLU.read_text().splitlines()[0])["question"]
    paras = [p for p in TEXTBOOK.split("\n\n") if len(p.split()) > 20]
    kinds = [
        lambda i: completion_text(f"{i:064x}", 220),
        lambda i: "\n\n".join(paras[i % len(paras) :] + paras[: i % len(paras)]),
        lambda i: "",
        lambda i: "\n\n".join(paras) + "\n\n" + question,
        lambda i: "Click here to subscribe.\n" * 40,
        lambda i: TEXTBOOK,
    ]
    return [make_doc(kinds[i % len(kinds)](i), id=f"d{i:03d}") for i in range(n)]


Verdicts = tuple[list[str], list[tuple[str, str]]]


def _verdicts(out: StageOutput) -> Verdicts:
    return [d.id for d in out.kept], [(r.id, r.reason) for r in out.rejected]


def _sorted(v: Verdicts) -> Verdicts:
    return v[0], sorted(v[1])


def test_quality_slices_run_on_dask_workers_with_the_local_verdicts(
    client: Client, state: Path
) -> None:
    settings = FilterSettings(decontam=DecontamSettings(benchmarks=[str(MMLU)]))
    chunks = [_docs(120)[:60], _docs(120)[60:]]
    local = QualityStage(settings, state, workers=1)
    on_dask = QualityStage(settings, state, pool_min_docs=1, client=client)
    reasons: set[str] = set()
    for chunk in chunks:
        kept, rejected = _verdicts(on_dask.run(chunk))
        assert (kept, sorted(rejected)) == _sorted(_verdicts(local.run(chunk)))
        # in the local pool's order too: the two halves' results, one after the other
        halves = [run_chain(chunk[:30], local.chain()), run_chain(chunk[30:], local.chain())]
        assert rejected == [(r.id, r.reason) for h in halves for r in h.rejected]
        reasons |= {reason for _, reason in rejected}
    assert on_dask.counts == local.counts
    assert len(reasons) >= 3, reasons  # the slices saw several filters at work

    workers = client.run(os.getpid)  # address -> pid of each worker process of the cluster
    assert len(workers) == 2
    # every slice ran in a worker process of this cluster, both took one per chunk
    assert on_dask.dask_slices == {(w, pid): 2 for w, pid in workers.items()}
    assert os.getpid() not in workers.values()
    assert on_dask.dask_builds == dict.fromkeys(workers, 1)  # once per worker, not per slice
    assert on_dask._chain is None and on_dask._pool is None  # nothing ran in this process

    tokens = client.run(dask_chain_tokens)
    assert all(on_dask.spec.token in t for t in tokens.values())
    on_dask.close()
    assert not any(on_dask.spec.token in t for t in client.run(dask_chain_tokens).values())


def test_small_chunks_and_a_cluster_without_workers_stay_in_process(
    client: Client, state: Path
) -> None:
    settings = FilterSettings()
    small = QualityStage(settings, state, client=client)  # under POOL_MIN_DOCS
    small.run(_docs(12))
    assert not small.dask_slices and small._chain is not None

    class NoWorkers:
        def nthreads(self) -> dict[str, int]:
            return {}

    no_workers: Any = NoWorkers()  # an adaptive cluster scaled down to nothing
    idle = QualityStage(settings, state, workers=1, pool_min_docs=1, client=no_workers)
    idle.run(_docs(12))
    assert not idle.dask_slices and idle._chain is not None


# -- a nightly run on Dask -----------------------------------------------------------------------


@pytest.mark.slow
def test_nightly_on_dask_filters_on_the_cluster_workers(
    prefect_api: str,
    tmp_path: Path,
    write_config: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from booksmith.flows.nightly import nightly
    from booksmith.flows.task_runners import with_runner
    from booksmith.schemas.config import load_config

    seen: list[tuple[QualityStage, dict[str, int]]] = []
    close = QualityStage.close

    def spy(stage: QualityStage) -> None:  # the cluster's workers, before the run ends
        seen.append((stage, stage.client.run(os.getpid) if stage.client else {}))
        close(stage)

    monkeypatch.setattr(QualityStage, "close", spy)
    monkeypatch.setattr(stages, "POOL_MIN_DOCS", 1)  # even small chunks go to the workers
    monkeypatch.setenv("PREFECT_API_URL", prefect_api)  # the workers' generation tasks report
    with FakeServer({"latency_s": 0.01}) as server:
        cfg = fake_backend_config(server.base_url, tmp_path / "out")
        cfg["plan"].update({"limit": 24, "chunk_requests": 8})
        cfg["runner"] = "dask"
        cfg["dask"] = {"n_workers": 2, "threads_per_worker": 1}
        config = write_config(cfg)
        version = Path(with_runner(nightly, load_config(config))(config=str(config)))

    [(stage, workers)] = seen
    assert stage.client is not None and len(workers) == 2
    assert {w for w, _ in stage.dask_slices} == set(workers)
    assert {pid for _, pid in stage.dask_slices} == set(workers.values())
    assert os.getpid() not in workers.values()
    assert sum(stage.dask_slices.values()) == 2 * 3  # three chunks, one slice per worker
    assert stage.dask_builds == dict.fromkeys(workers, 1)
    assert stage._chain is None and stage._pool is None
    assert pq.read_table(version / "text").num_rows > 0
