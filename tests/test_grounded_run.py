"""`booksmith run --sources` end to end on the fake server: a version whose documents carry
their provenance columns, a manifest that accounts for the sources (pre-generation rejects by
reason), a card that lists them with their licences, a state that keeps the next night off the
passages already planned, and a mixed run of topics and sources by their shares."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import yaml

from booksmith.filters.sources import Source
from booksmith.generation.source_state import PLANNED_DIR, planned_passages
from booksmith.prompts import _package_dir
from booksmith.schemas.grounding_settings import SourceSpec
from booksmith.schemas.records import GROUNDING_COLUMNS
from booksmith.shards.verify import verify
from booksmith.shards.version_dir import read_manifest, state_dir
from tests.conftest import fake_backend_config
from tests.fakeserver import FakeServer
from tests.test_grounded_plan import write_source


@pytest.fixture(scope="module")
def server() -> Iterator[FakeServer]:
    with FakeServer({}) as s:
        yield s


def _run(server: FakeServer, out: Path, write_config: Any, seed: int, **cfg: Any) -> Path:
    from booksmith.flows.nightly import nightly
    from booksmith.flows.task_runners import with_runner
    from booksmith.schemas.config import load_config

    data = fake_backend_config(server.base_url, out)
    data.update(seed=seed, **cfg)
    config = write_config(data, f"{out.name}-{seed}.yaml")
    return Path(with_runner(nightly, load_config(config))(config=str(config)))


def _front_matter(version: Path) -> dict[str, Any]:
    text = (version / "README.md").read_text(encoding="utf-8")
    return yaml.safe_load(text.split("---\n")[1])


def test_a_grounded_run_records_provenance_and_lists_its_sources(
    server: FakeServer, tmp_path: Path, write_config: Any
) -> None:
    source = write_source(tmp_path / "pydoc.jsonl", license="CC-BY-SA-4.0")
    out = tmp_path / "out"
    version = _run(server, out, write_config, 7, sources=[{"path": str(source)}],
                   plan={"limit": 12})  # fmt: skip
    manifest = read_manifest(version)
    account = manifest.counts.plan.sources["pydoc.jsonl"]
    assert account["planned"] == 12 and account["requests"] == 12
    assert account["records"] == 79 and len(account["checksum"]) == 64
    assert isinstance(account["rejected"], dict)
    plan = pq.read_table(version / "plan.parquet").to_pylist()
    assert len(plan) == 12 and all(r["source_id"] and r["recipe"] for r in plan)
    text = pq.read_table(version / "text").to_pylist()
    assert text, "the fake server's answers pass the filters"
    by_id = {r["id"]: r for r in plan}
    for doc in text:
        for column in GROUNDING_COLUMNS:
            assert doc[column] is not None and doc[column] == by_id[doc["id"]][column], column
        assert doc["license"] == "CC-BY-SA-4.0" and doc["source_name"] == "pydoc.jsonl"
        assert doc["source_checksum"] == account["checksum"]
    assert verify(version).ok
    # a version is a source too: its text shards, ids verbatim
    read = [r.id for b in Source(SourceSpec(path=str(version))).batches() for r in b]
    assert read == [doc["id"] for doc in text]
    meta = _front_matter(version)
    assert meta["license"] == "CC-BY-SA-4.0"  # share-alike: carried to the card
    assert meta["sources"][0]["name"] == "pydoc.jsonl" and meta["sources"][0]["share"] == 1.0
    assert "## Sources" in (version / "README.md").read_text(encoding="utf-8")
    report = (version / "report" / "report.md").read_text(encoding="utf-8")
    row = next(line for line in report.splitlines() if line.startswith("| pydoc.jsonl |"))
    assert "| 79 |" in row and "CC-BY-SA-4.0: 12" in row
    # the planned passages are recorded once the version is published...
    assert (state_dir(out) / PLANNED_DIR / f"{version.name}.npy").is_file()
    assert planned_passages(out).size == 12
    # a kill between the manifest and that record: the rerun (a no-op) writes it from the plan
    recorded = state_dir(out) / PLANNED_DIR / f"{version.name}.npy"
    keys = recorded.read_bytes()
    recorded.unlink()
    assert _run(server, out, write_config, 7, sources=[{"path": str(source)}],
                plan={"limit": 12}) == version  # fmt: skip
    assert recorded.read_bytes() == keys
    # ...and the next night takes others
    later = _run(server, out, write_config, 8, sources=[{"path": str(source)}],
                 plan={"limit": 12})  # fmt: skip
    first = {(r["source_id"], r["source_passage"]) for r in plan}
    second = {(r["source_id"], r["source_passage"])
              for r in pq.read_table(later / "plan.parquet").to_pylist()}  # fmt: skip
    assert len(second) == 12 and not first & second
    assert planned_passages(out).size == 24


def test_a_mixed_run_plans_topics_and_sources_by_their_shares(
    server: FakeServer, tmp_path: Path, write_config: Any
) -> None:
    source = write_source(tmp_path / "pydoc.jsonl")
    topics = _package_dir() / "topics" / "default.yaml"
    version = _run(server, tmp_path / "out", write_config, 7, topics=str(topics),
                   sources=[{"path": str(source), "share": 2}], plan={"limit": 12},
                   grounding={"topics_share": 1})  # fmt: skip
    plan = pq.read_table(version / "plan.parquet").to_pylist()
    grounded = [r for r in plan if r["source_id"] is not None]
    assert len(plan) == 12 and len(grounded) == 8
    topic_rows = [r for r in plan if r["source_id"] is None]
    assert all(r["recipe"] is None and r["license"] is None for r in topic_rows)
    meta = _front_matter(version)
    assert meta["license"] == "other"  # PSF-2.0 binds nothing further
    assert meta["sources"][0]["share"] == round(8 / 12, 4)


def test_a_killed_grounded_run_resumes_on_the_same_passages(
    server: FakeServer, prefect_api: str, tmp_path: Path, write_config: Any
) -> None:
    """SIGKILL after the first chunk, then the same command: the version equals an
    uninterrupted run's (the same passages planned, the same documents kept), the rerun resumed
    at its checkpoint, and the planned passages are recorded once."""
    import os
    import subprocess
    import sys

    from booksmith.schemas.crashpoints import ENV

    source = write_source(tmp_path / "pydoc.jsonl")

    def booksmith_run(out: Path, crash: str | None = None) -> subprocess.CompletedProcess[str]:
        data = fake_backend_config(server.base_url, out)
        data.update(seed=9, sources=[{"path": str(source)}],
                    plan={"limit": 12, "chunk_requests": 4})  # fmt: skip
        config = write_config(data, f"{out.name}.yaml")
        env = {**os.environ, "PREFECT_API_URL": prefect_api}
        env.pop(ENV, None)
        if crash:
            env[ENV] = crash
        return subprocess.run([sys.executable, "-m", "booksmith", "run", "--config", str(config)],
                              env=env, capture_output=True, text=True, timeout=600)  # fmt: skip

    def rows(version: Path, kind: str, columns: list[str]) -> list[tuple[Any, ...]]:
        table = pq.read_table(version / kind, columns=columns).to_pylist()
        return sorted(tuple(r[c] for c in columns) for r in table)

    whole = booksmith_run(tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr[-3000:]
    killed = booksmith_run(tmp_path / "killed", crash="chunk.done")
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert not (state_dir(tmp_path / "killed") / PLANNED_DIR).exists()
    resumed = booksmith_run(tmp_path / "killed")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = (
        Path(whole.stdout.strip().splitlines()[-1]),
        Path(resumed.stdout.strip().splitlines()[-1]),
    )
    assert read_manifest(b).counts.chunks.resumed == 1
    plan_columns = ["id", "source_id", "source_passage", "recipe"]
    assert rows(a, "plan.parquet", plan_columns) == rows(b, "plan.parquet", plan_columns)
    assert rows(a, "text", ["id", "text_sha256"]) == rows(b, "text", ["id", "text_sha256"])
    assert planned_passages(tmp_path / "killed").size == 12


def test_fill_rounds_plan_more_passages_of_a_source(
    server: FakeServer, tmp_path: Path, write_config: Any
) -> None:
    """A run from sources only that wants 20 documents from a first round of 6: the fill rounds
    ask the source for further passages, none planned twice, all of them recorded."""
    source = write_source(tmp_path / "pydoc.jsonl")
    out = tmp_path / "out"
    version = _run(server, out, write_config, 7, sources=[{"path": str(source)}],
                   plan={"limit": 6}, fill={"documents": 20, "max_rounds": 3})  # fmt: skip
    manifest = read_manifest(version)
    fill = manifest.counts.fill
    assert fill is not None and len(fill.rounds) >= 2 and fill.rounds[0].planned == 6
    assert manifest.documents >= 20, fill
    plan = pq.read_table(version / "plan.parquet").to_pylist()
    passages = [(r["source_id"], r["source_passage"]) for r in plan]
    assert len(plan) > 6 and all(r["source_id"] for r in plan)
    assert len(set(passages)) == len(passages)
    account = manifest.counts.plan.sources["pydoc.jsonl"]
    assert account["planned"] == account["requests"] == len(plan)
    assert planned_passages(out).size == len(plan)


def test_a_mixed_run_fills_from_topics_and_sources(
    server: FakeServer, tmp_path: Path, write_config: Any
) -> None:
    """Fill rounds of a mixed run ask both the topics and the source for more, by share."""
    source = write_source(tmp_path / "pydoc.jsonl")
    topics = _package_dir() / "topics" / "default.yaml"
    version = _run(server, tmp_path / "out", write_config, 7, topics=str(topics),
                   sources=[{"path": str(source)}], plan={"limit": 8},
                   fill={"documents": 24, "max_rounds": 2})  # fmt: skip
    manifest = read_manifest(version)
    assert manifest.counts.fill is not None and len(manifest.counts.fill.rounds) == 2
    later = pq.read_table(version / "plan.parquet").to_pylist()[8:]
    assert any(r["source_id"] for r in later) and any(r["source_id"] is None for r in later)
    passages = [(r["source_id"], r["source_passage"]) for r in later if r["source_id"]]
    assert len(set(passages)) == len(passages)
