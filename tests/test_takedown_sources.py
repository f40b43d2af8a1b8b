"""Takedown by source id (issue 18): `booksmith datasets takedown OUT --source-id ID` removes
every document derived from that source record, in every version, and no later run plans from
it again, though the source file still holds it."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from booksmith.generation.source_state import taken_down_records
from booksmith.shards.verify import verify
from tests.conftest import fake_backend_config
from tests.fakeserver import FakeServer
from tests.test_grounded_plan import write_source

pytestmark = pytest.mark.slow


def _run(server: FakeServer, out: Path, write_config: Any, seed: int, **cfg: Any) -> Path:
    from booksmith.flows.nightly import nightly
    from booksmith.flows.task_runners import with_runner
    from booksmith.schemas.config import load_config

    data = fake_backend_config(server.base_url, out)
    data.update(seed=seed, **cfg)
    config = write_config(data, f"{out.name}-{seed}.yaml")
    return Path(with_runner(nightly, load_config(config))(config=str(config)))


def _takedown(out: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "booksmith", "datasets", "takedown", str(out), *args],
        capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL,
    )  # fmt: skip


def _source_ids(version: Path, kind: str) -> list[str]:
    return pq.read_table(version / kind, columns=["source_id"]).column("source_id").to_pylist()


def test_takedown_by_source_id_reaches_every_derived_document_and_later_runs(
    prefect_api: str, tmp_path: Path, write_config: Any
) -> None:
    source = write_source(tmp_path / "pydoc.jsonl")
    out = tmp_path / "out"
    sources = [{"path": str(source)}]
    with FakeServer({"near_duplicate": 0.2}) as server:
        first = _run(server, out, write_config, 1, sources=sources, plan={"limit": 24})
        derived = Counter(_source_ids(first, "text") + _source_ids(first, "rejected"))
        target = derived.most_common(1)[0][0]  # the record most documents came from

        asked = _takedown(out, "--source-id", target)  # no terminal: it asks for --yes
        assert asked.returncode == 2 and "pass --yes" in asked.stderr
        assert not taken_down_records(out)
        done = _takedown(out, "--source-id", target, "--source", "pydoc.jsonl", "--yes")
        assert done.returncode == 0, done.stderr
        assert f"{derived[target]} derived documents" in done.stderr

        for kind in ("text", "rejected", "plan.parquet"):
            assert target not in _source_ids(first, kind), kind
        assert ("pydoc.jsonl", target) in taken_down_records(out)
        assert verify(first).ok  # the rewritten plan and shards match the manifest
        # A later run that may repeat passages still never plans from the record.
        second = _run(server, out, write_config, 2, sources=sources, plan={"limit": 24},
                      grounding={"repeat": "any"})  # fmt: skip
    planned = _source_ids(second, "plan.parquet")
    assert planned and target not in planned
