"""Scale-out: generation partitions on a Dask cluster, several endpoints sharing the load, topic
rotation across nightly runs. Every run is a real Prefect flow run against a fake server whose
answers are a pure function of the request, so two runs can be compared document by document."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from booksmith.generation.client import Endpoint
from booksmith.generation.scaleout import assign, merge_reports, partition
from booksmith.schemas import Sampling
from booksmith.schemas.records import GenerationRequest
from booksmith.shards.version_dir import list_versions, read_manifest
from tests.conftest import fake_backend_config
from tests.fakeserver import FakeServer

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def server() -> Iterator[FakeServer]:
    with FakeServer({"latency_s": 0.01}) as s:
        yield s


def _documents(version: Path) -> set[tuple[str, str]]:
    table = pq.read_table(version / "text", columns=["id", "text_sha256"])
    ids, shas = table.column("id").to_pylist(), table.column("text_sha256").to_pylist()
    return set(zip(ids, shas, strict=True))


def _cli_run(config: Path, api: str) -> tuple[Path, str]:
    """`booksmith run`: the version it wrote and its stderr (where the Dask cluster logs)."""
    result = subprocess.run(
        [sys.executable, "-m", "booksmith", "run", "--config", str(config)],
        env={**os.environ, "PREFECT_API_URL": api},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return Path(result.stdout.strip().splitlines()[-1]), result.stderr


def _requests(n: int) -> list[GenerationRequest]:
    return [
        GenerationRequest.build(
            messages=[{"role": "user", "content": f"prompt {i}"}],
            model="m",
            sampling=Sampling(max_tokens=8),
            topic="t",
            topic_path=["t"],
            audience="a",
            style="s",
            format="f",
            seed_words=[],
            template="x",
        )
        for i in range(n)
    ]


def test_partitions_cover_the_plan_once_in_order_and_share_limits() -> None:
    plan = _requests(10)
    parts = partition(plan, 4)
    assert [r.id for p in parts for r in p] == [r.id for r in plan]
    assert [len(p) for p in parts] == [3, 3, 3, 1]
    assert partition(plan, 50) == [[r] for r in plan]
    a = Endpoint(base_url="http://a", model="m", max_concurrency=8, rpm=600, tpm=None)
    b = Endpoint(base_url="http://b", model="m", max_concurrency=4, rpm=None, tpm=1000)
    shares = assign(parts, [a, b])
    # a serves parts 0 and 2, b parts 1 and 3: each gets half of its endpoint's limits
    assert [s.base_url for s in shares] == ["http://a", "http://b", "http://a", "http://b"]
    assert shares[0].max_concurrency == 4 and shares[0].rpm == 300
    assert shares[1].max_concurrency == 2 and shares[1].tpm == 500
    assert merge_reports([]).planned == 0


@pytest.mark.slow
def test_dask_cluster_writes_the_same_dataset_as_the_thread_pool(
    prefect_api: str, server: FakeServer, tmp_path: Path, write_config
) -> None:
    threads = fake_backend_config(server.base_url, tmp_path / "threads")
    threads["plan"]["limit"] = 16
    dask = fake_backend_config(server.base_url, tmp_path / "dask")
    dask["plan"]["limit"] = 16
    dask["generation"]["partitions"] = 4
    dask["runner"] = "dask"
    dask["dask"] = {"n_workers": 2, "threads_per_worker": 1}

    on_threads, threads_log = _cli_run(write_config(threads, "threads.yaml"), prefect_api)
    on_dask, dask_log = _cli_run(write_config(dask, "dask.yaml"), prefect_api)
    # the run's tasks went through Prefect's Dask client to a cluster of two workers
    assert "PrefectDaskClient" not in threads_log
    assert "Receive client connection: PrefectDaskClient" in dask_log
    assert dask_log.count("Register worker addr") == 2

    assert _documents(on_threads) == _documents(on_dask) and _documents(on_dask)
    a, b = read_manifest(on_threads), read_manifest(on_dask)
    assert a.counts.generate.planned == b.counts.generate.planned == 16
    assert pq.read_table(on_threads / "plan.parquet").equals(
        pq.read_table(on_dask / "plan.parquet")
    )
    assert b.config["runner"] == "dask"


def test_several_endpoints_share_the_load(
    prefect_api: str, server: FakeServer, tmp_path: Path, write_config
) -> None:
    from booksmith.flows.nightly import nightly

    with FakeServer({"latency_s": 0.01}) as second:
        server.reset()
        cfg = fake_backend_config(server.base_url, tmp_path / "two")
        cfg["plan"]["limit"] = 12
        cfg["generation"]["endpoints"] = [
            {"base_url": server.base_url, "max_concurrency": 2},
            {"base_url": second.base_url, "requests_per_minute": 6000},
        ]
        version = Path(nightly(config=str(write_config(cfg, "two.yaml"))))
        first_n, second_n = server.stats()["requests"], second.stats()["requests"]
    assert first_n == second_n == 6  # two partitions, one per endpoint, 6 requests each

    single = fake_backend_config(server.base_url, tmp_path / "one")
    single["plan"]["limit"] = 12
    reference = Path(nightly(config=str(write_config(single, "one.yaml"))))
    assert _documents(version) == _documents(reference)


def test_nightly_runs_take_the_topics_not_yet_covered(
    prefect_api: str, server: FakeServer, tmp_path: Path, write_config
) -> None:
    from booksmith.flows.nightly import nightly

    topics = tmp_path / "topics.yaml"
    names = [
        "Fractions",
        "Photosynthesis",
        "Plate tectonics",
        "Supply and demand",
        "Sorting",
        "Haiku",
    ]
    topics.write_text(yaml.safe_dump([{"topic": t, "subject": "Mixed"} for t in names]))
    cfg = fake_backend_config(server.base_url, tmp_path / "out")
    cfg["topics"] = str(topics)
    cfg["plan"] = {"limit": None, "topics_per_run": 4, "rotation": "uncovered"}
    config = write_config(cfg)

    first = Path(nightly(config=str(config)))
    covered_first = set(pq.read_table(first / "plan.parquet").column("topic").to_pylist())
    assert covered_first == set(names[:4])  # nothing covered yet: the file's order
    cfg["seed"] = 8  # the next night
    second = Path(nightly(config=str(write_config(cfg, "night2.yaml"))))
    covered_second = set(pq.read_table(second / "plan.parquet").column("topic").to_pylist())
    # the two never covered come first, then the least covered of the rest
    assert set(names[4:]) <= covered_second and len(covered_second) == 4
    selection = read_manifest(second).counts.plan.topics
    assert selection == {"rotation": "uncovered", "topics": 4, "uncovered_before": 2}
    assert list_versions(tmp_path / "out") == [first, second]


def test_rolling_window_moves_on_each_run(tmp_path: Path) -> None:
    from booksmith.generation.coverage import select_topics
    from booksmith.schemas import TopicSeed
    from booksmith.schemas.config import PlanSettings

    seeds = [TopicSeed(topic=f"t{i}") for i in range(5)]
    plan = PlanSettings(topics_per_run=2, rotation="window")
    picked, account = select_topics(seeds, plan, tmp_path)
    assert [s.topic for s in picked] == ["t0", "t1"] and account["start"] == 0
    for i in range(3):  # three versions written: the window starts at 6 mod 5 = 1
        (tmp_path / f"v{i}").mkdir()
        (tmp_path / f"v{i}" / "manifest.json").write_text('{"shards": []}')
    picked, account = select_topics(seeds, plan, tmp_path)
    assert [s.topic for s in picked] == ["t1", "t2"] and account["start"] == 1
