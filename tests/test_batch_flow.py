"""The Batch API backend inside the nightly flow: same documents as live calls to a server that
answers the same way, results joined into the same cache, nothing submitted twice."""

from __future__ import annotations

import shutil
from pathlib import Path

import pyarrow.parquet as pq
from typer.testing import CliRunner

from booksmith.flows.cli import app
from booksmith.generation.batch import list_batches
from booksmith.shards.version_dir import read_manifest
from tests.batchserver import BatchServer
from tests.conftest import fake_backend_config
from tests.fakeserver import FakeServer


def _documents(version: Path) -> set[tuple[str, str]]:
    table = pq.read_table(version / "text", columns=["id", "text_sha256"])
    ids, shas = table.column("id").to_pylist(), table.column("text_sha256").to_pylist()
    return set(zip(ids, shas, strict=True))


def test_nightly_on_the_batch_api_matches_live_calls(
    prefect_api: str, tmp_path: Path, write_config
) -> None:
    from booksmith.flows.nightly import nightly

    with BatchServer() as batch_server:
        cfg = fake_backend_config(batch_server.base_url, tmp_path / "batch")
        cfg["plan"]["limit"] = 12
        cfg["dedup"] = {"index": "none"}
        cfg["generation"]["backend"] = "batch"
        cfg["generation"]["batch"] = {"poll_interval_s": 0.05, "max_requests_per_file": 5}
        cfg["generation"]["prices"] = {
            "fake-model": {"prompt_per_million": 2.0, "completion_per_million": 8.0}
        }
        config = write_config(cfg, "batch.yaml")
        version = Path(nightly(config=str(config)))
        assert batch_server.batches_created == 3  # 12 requests, 5 per file
        assert set(batch_server.processed.values()) == {1}
        gen = read_manifest(version).counts.generate
        assert gen.completed == 12 and gen.cached == 0
        # half the live price: the cost is the batch price of the tokens used
        live_cost = (gen.prompt_tokens * 2.0 + gen.completion_tokens * 8.0) / 1e6
        assert abs(gen.cost_usd - live_cost / 2) < 1e-6
        records = list_batches(tmp_path / "batch" / "_state" / "batches")
        assert len(records) == 3 and {r.status for r in records} == {"completed"}
        shown = CliRunner().invoke(app, ["batches", "list", "--config", str(config)])
        assert shown.exit_code == 0 and shown.output.count("completed") == 3

        # The same config and seed again is a no-op; with the version moved away, a rerun
        # takes everything from the response cache.
        assert Path(nightly(config=str(config))) == version
        version = Path(shutil.move(version, tmp_path / "first"))
        again = Path(nightly(config=str(config)))  # all from the response cache
        assert batch_server.batches_created == 3
        assert read_manifest(again).counts.generate.cached == 12

    with FakeServer() as live:
        cfg = fake_backend_config(live.base_url, tmp_path / "live")
        cfg["plan"]["limit"] = 12
        live_version = Path(nightly(config=str(write_config(cfg, "live.yaml"))))
    assert _documents(version) == _documents(live_version) == _documents(again)
