"""The nightly flow end to end on a real Prefect server, against the fault-injecting endpoint;
outputs read back with pyarrow and DuckDB."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import duckdb
import pyarrow.parquet as pq
import pytest

from booksmith.pipeline.publish import RunNotPublished
from booksmith.schemas import SCHEMA_VERSION, Document, arrow_schema
from booksmith.shards.files import file_sha256
from booksmith.shards.version_dir import list_versions, read_manifest
from tests.conftest import fake_backend_config
from tests.fakeserver import FakeServer

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server() -> Iterator[FakeServer]:
    faults = {
        "rate_limit": 0.1,
        "retry_after_s": 0.05,
        "server_error": 0.1,
        "drop": 0.05,
        "truncated": 0.1,
        "empty": 0.1,
        "bad_request": 0.1,
    }
    with FakeServer(faults) as s:
        yield s


def run_flow(config: Path) -> Path:
    from booksmith.flows.nightly import nightly

    return Path(nightly(config=str(config)))


def test_nightly_writes_a_complete_dataset_version(
    prefect_api: str, server: FakeServer, tmp_path: Path, write_config
) -> None:
    server.reset()
    out = tmp_path / "out"
    cfg = fake_backend_config(server.base_url, out)
    cfg["plan"]["limit"] = 30
    version = run_flow(write_config(cfg))

    assert list_versions(out) == [version]
    manifest = read_manifest(version)
    assert manifest.config_hash and manifest.code_version and manifest.tokens
    assert manifest.schema_version == SCHEMA_VERSION and manifest.run_id == version.name
    gen = manifest.counts.generate
    # every planned request is a document, a rejected document or a recorded failure
    assert gen.planned == 30 == gen.completed + gen.failed
    assert manifest.documents + manifest.counts.rejected == gen.completed
    assert gen.failed > 0 and gen.retries > 0 and gen.empty > 0
    assert manifest.counts.filter["empty"]["empty:no_text"] == gen.empty
    # retries by reason, summed over the chunks into the manifest, and itemised in the report
    assert sum(gen.retry_reasons.values()) == gen.retries
    assert gen.retry_reasons.get("http_429", 0) > 0 and gen.retry_reasons.get("connection", 0) > 0
    report = (version / "report" / "report.md").read_text()
    assert "### Retries and failures by reason" in report
    for reason in gen.retry_reasons.keys() | gen.failures.keys():
        retried, failed = gen.retry_reasons.get(reason, 0), gen.failures.get(reason, 0)
        assert f"| {reason} | {retried} | {failed} |" in report
    # the effective rate over time: every request made is in one of its points
    assert gen.rate and sum(p["requests"] for p in gen.rate) == gen.requests
    report = (version / "report" / "report.md").read_text()
    first = gen.rate[0]
    assert "Effective rate over the run" in report
    assert f"| {first['t_s']:.0f} | {first['rpm']:.0f} | {first['rate_limited']} |" in report

    # every shard is where the manifest says, with its rows, bytes and checksum
    for shard in manifest.shards:
        path = version / shard.path
        assert path.stat().st_size == shard.bytes
        assert file_sha256(path) == shard.sha256
        assert pq.ParquetFile(path).metadata.num_rows == shard.rows
    assert not list(version.rglob(".*tmp*")), "temporary files left behind"

    text = pq.read_table(version / "text")
    assert text.schema.equals(arrow_schema(Document))
    assert text.num_rows == manifest.documents
    assert text.column("id").to_pylist() == list(dict.fromkeys(text.column("id").to_pylist()))
    assert all(t.strip() for t in text.column("text").to_pylist())
    assert sum(text.column("n_tokens").to_pylist()) == manifest.tokens["cl100k_base"].tokens
    assert set(text.column("backend").to_pylist()) == {"openai"}
    assert not any(text.column("truncated").to_pylist())  # dropped by default

    rejected = pq.read_table(version / "rejected").to_pylist()
    by_reason = {r["reason"]: r for r in rejected}
    assert set(by_reason) == {"empty:no_text", "truncated:finish_length"}
    assert by_reason["truncated:finish_length"]["finish_reason"] == "length"
    assert manifest.counts.filter["generation_artifacts"]["truncated:finish_length"] == sum(
        r["reason"] == "truncated:finish_length" for r in rejected
    )
    failures = pq.read_table(version / "failures.parquet").to_pylist()
    assert len(failures) == gen.failed and all(f["error"] == "http_400" for f in failures)

    plan = pq.read_table(version / "plan.parquet")
    assert plan.num_rows == 30
    assert set(text.column("id").to_pylist()) <= set(plan.column("id").to_pylist())

    # DuckDB reads the shards as they are
    con = duckdb.connect()
    n, topics = con.execute(
        f"SELECT count(*), count(DISTINCT topic) FROM read_parquet('{version}/text/*.parquet')"
    ).fetchone()
    assert n == manifest.documents and topics > 1
    assert json.loads(text.column("sampling")[0].as_py())["max_tokens"] == 256

    # the diversity report is in the manifest and the rendered report
    div = manifest.diversity
    for key in ("distinct_1", "distinct_2", "distinct_3", "top_opener_share"):
        assert 0 < getattr(div, key) <= 1
    assert div.compression_ratio > 1 and div.documents == manifest.documents
    assert sum(div.axis_coverage["format"].counts.values()) == manifest.documents
    report_md = (version / "report" / "report.md").read_text()
    assert report_md.count("distinct-") == 3
    # tokens per encoding, throughput, and the first kept documents, quoted
    assert f"| cl100k_base | {manifest.documents} |" in report_md
    assert "completion tokens/s" in report_md
    first = text.slice(0, 1).to_pylist()[0]
    assert (
        f"`{first['id']}`" in report_md and "> " + first["text"].splitlines()[0][:40] in report_md
    )
    # no classifier configured: the quality histogram is empty and not plotted
    assert sum(manifest.quality.kept) == 0 and not (version / "report" / "quality.png").exists()
    from typer.testing import CliRunner

    from booksmith.flows.cli import app

    shown = CliRunner().invoke(app, ["report", str(version)])
    assert shown.exit_code == 0 and "distinct_2" in shown.output


def test_same_config_and_seed_rerun_is_a_noop_and_identical_once_removed(
    prefect_api: str, server: FakeServer, tmp_path: Path, write_config
) -> None:
    out = tmp_path / "out"
    cfg = fake_backend_config(server.base_url, out)
    cfg["dedup"] = {"index": "none"}
    config = write_config(cfg)
    first = run_flow(config)
    requests_before = server.stats()["requests"]
    # A retried night (same config, seed and topics) names the version it already wrote.
    assert run_flow(config) == first and list_versions(out) == [first]
    # With that version removed, the rerun writes the same documents again from the cache.
    moved = shutil.move(first, tmp_path / "first")
    first = Path(moved)
    second = run_flow(config)
    assert server.stats()["requests"] == requests_before  # all from the response cache
    assert list_versions(out) == [second]
    a = pq.read_table(first / "text").select(["id", "text_sha256"]).to_pylist()
    b = pq.read_table(second / "text").select(["id", "text_sha256"]).to_pylist()
    assert a == b and len(a) > 0
    assert pq.read_table(first / "plan.parquet").equals(pq.read_table(second / "plan.parquet"))
    gen = read_manifest(second).counts.generate
    assert gen.cached == gen.completed and gen.requests == 0


def test_a_second_run_drops_what_earlier_runs_kept(
    prefect_api: str, server: FakeServer, tmp_path: Path, write_config
) -> None:
    # With the default file index, the rerun's documents are the first run's: all dropped as
    # exact duplicates of the documents already in the first version.
    out = tmp_path / "out"
    config = write_config(fake_backend_config(server.base_url, out))
    first = run_flow(config)
    kept_first = pq.read_table(first / "text").column("id").to_pylist()
    assert kept_first
    # The same requests under another config (the same config and seed would be a no-op).
    cfg = fake_backend_config(server.base_url, out)
    cfg["output"]["shard_rows"] = 1000
    # It kept nothing, so it is not a version: set aside with its evidence (pipeline/publish)
    with pytest.raises(RunNotPublished, match="kept 0 documents"):
        run_flow(write_config(cfg, "second.yaml"))
    assert list_versions(out) == [first]
    (second,) = (out / "_state" / "failed").iterdir()
    assert pq.read_table(second / "text").num_rows == 0
    rejected = pq.read_table(second / "rejected").to_pylist()
    dups = {r["id"]: r for r in rejected if r["reason"] == "dedup_exact"}
    assert set(dups) == set(kept_first)
    assert all(r["duplicate_of"] == i for i, r in dups.items())  # the same document, earlier
    assert read_manifest(second).counts.filter["dedup_exact"]["dedup_exact"] == len(dups)

    # A third run with a new seed plans new requests: kept, none of them a first-run document.
    cfg = fake_backend_config(server.base_url, out)
    cfg["seed"] = 8
    third = run_flow(write_config(cfg, "third.yaml"))
    kept_third = pq.read_table(third / "text").column("id").to_pylist()
    assert kept_third and not set(kept_third) & set(kept_first)


def test_a_different_seed_plans_different_requests(
    prefect_api: str, server: FakeServer, tmp_path: Path, write_config
) -> None:
    from typer.testing import CliRunner

    from booksmith.flows.cli import app

    cfg = fake_backend_config(server.base_url, tmp_path / "out")
    config_a = write_config(cfg, "a.yaml")
    # `booksmith plan` previews exactly the plan the run then writes, byte for byte.
    written = tmp_path / "preview.parquet"
    preview = CliRunner().invoke(app, ["plan", "--config", str(config_a), "-o", str(written)])
    assert preview.exit_code == 0, preview.output
    assert "requests" in preview.output and "completion tokens" in preview.output
    a = run_flow(config_a)
    assert written.read_bytes() == (a / "plan.parquet").read_bytes()
    cfg["seed"] = 8
    b = run_flow(write_config(cfg, "b.yaml"))
    ids_a = set(pq.read_table(a / "plan.parquet").column("id").to_pylist())
    ids_b = set(pq.read_table(b / "plan.parquet").column("id").to_pylist())
    assert ids_a.isdisjoint(ids_b)


def test_without_a_seed_the_run_date_decides_the_plan(
    prefect_api: str, server: FakeServer, tmp_path: Path, write_config
) -> None:
    from datetime import UTC, datetime

    from booksmith.flows.nightly import seed_for

    cfg = fake_backend_config(server.base_url, tmp_path / "out")
    del cfg["seed"]
    cfg["plan"]["limit"] = 2
    version = run_flow(write_config(cfg))
    assert read_manifest(version).seed == seed_for(datetime.now(UTC).date())
    assert seed_for(datetime(2026, 1, 2).date()) != seed_for(datetime(2026, 1, 3).date())


def test_run_publishes_report_failures_and_progress_artifacts(
    prefect_api: str, server: FakeServer, tmp_path: Path, write_config
) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterType

    version = run_flow(write_config(fake_backend_config(server.base_url, tmp_path / "out")))
    run_id = version.name
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(
                type=ArtifactFilterType(any_=["markdown", "table", "progress"])
            )
        )
    mine = [a for a in artifacts if run_id in (a.description or "")]
    kinds = {a.type: a for a in mine}
    assert set(kinds) == {"markdown", "table", "progress"}
    assert f"# Run {run_id}" in str(kinds["markdown"].data)
    assert kinds["progress"].data == 100.0
    # Prefect's database is out of a takedown's reach: the artifact quotes no document.
    report = (version / "report" / "report.md").read_text(encoding="utf-8")
    assert "## Sample documents" in report and "## Sample documents" in str(kinds["markdown"].data)
    for doc in pq.read_table(version / "text", columns=["text"]).column("text").to_pylist():
        assert doc[:60] not in str(kinds["markdown"].data)


def test_a_full_disk_is_one_line_and_the_rerun_loses_nothing(
    prefect_api: str, tmp_path: Path, write_config, monkeypatch
) -> None:
    """The disk fills while a run writes its Parquet files (a fault injected into pyarrow's
    writer): the run stops with one line naming output.dir and what to do, publishes nothing,
    and the run started again once there is room finishes without asking twice for what was
    answered (at most the requests in flight when it stopped)."""
    import errno

    from booksmith.shards.files import DiskFull

    real = pq.ParquetWriter.write_table
    writes = [0]

    def full(self: pq.ParquetWriter, table: object, *args: object, **kw: object) -> None:
        writes[0] += 1
        if writes[0] > 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(self, table, *args, **kw)

    out = tmp_path / "out"
    with FakeServer() as server:  # no faults: each request is answered once, counts are exact
        cfg = fake_backend_config(server.base_url, out)
        cfg["plan"].update({"limit": 30, "chunk_requests": 10})
        config = write_config(cfg)
        monkeypatch.setattr(pq.ParquetWriter, "write_table", full)
        with pytest.raises(DiskFull) as failed:
            run_flow(config)
        first = server.stats()["requests"]
        monkeypatch.undo()  # room again
        version = run_flow(config)
        second = server.stats()["requests"] - first
    message = str(failed.value)
    assert message.startswith(f"output.dir: the disk holding {out} is full (")
    assert "run again with the same config and seed" in message and "\n" not in message
    assert first > 0 and list_versions(out) == [version]
    gen = read_manifest(version).counts.generate
    assert gen.planned == 30 and gen.cached + second == 30
    assert first + second <= 30 + cfg["generation"]["max_concurrency"]


def test_takedown_reaches_the_cache_near_duplicates_and_reports(
    prefect_api: str, tmp_path: Path, write_config
) -> None:
    """A kept document taken down after a real run: its rejected near-duplicates go with it,
    its answer leaves the response cache and is tombstoned (a later run with the same requests
    does not ask for it again, whatever retry_failed says), the version's report is rebuilt
    without it, --dry-run changes nothing, and the log records it."""
    from typer.testing import CliRunner

    from booksmith.flows.cli import app
    from booksmith.generation.cache import ResponseCache

    out = tmp_path / "out"
    with FakeServer({"near_duplicate": 0.5, "near_duplicate_pool": 2}) as server:
        cfg = fake_backend_config(server.base_url, out)
        first = run_flow(write_config(cfg))
        rejected = pq.read_table(first / "rejected").to_pylist()
        near = [r for r in rejected if r["duplicate_of"]]
        assert near, "the fake server made no near-duplicates"
        target = near[0]["duplicate_of"]
        twins = {r["id"] for r in near if r["duplicate_of"] == target}
        runner = CliRunner()
        dry = runner.invoke(app, ["datasets", "takedown", str(out), target, "--dry-run"])
        assert dry.exit_code == 0, dry.output
        assert json.loads(dry.stdout.splitlines()[-1])["places"] == {
            first.name: {"text": 1, "rejected": len(twins)}
        }
        assert target in pq.read_table(first / "text").column("id").to_pylist()
        done = runner.invoke(app, ["datasets", "takedown", str(out), target, "--yes"])
        assert done.exit_code == 0, done.output
        for kind in ("text", "rejected"):
            ids = set(pq.read_table(first / kind).column("id").to_pylist())
            assert not ids & {target, *twins}
        report = (first / "report" / "report.md").read_text()
        assert f"| documents kept | {read_manifest(first).documents} |" in report
        cache = ResponseCache(out / "_state" / "responses.sqlite")
        assert all(cache.get(i) is None for i in {target, *twins})
        cache.close()
        (entry,) = [json.loads(x) for x in (out / "_state" / "takedowns.jsonl").open()]
        assert entry["ids"] == [target] and set(entry["with_near_duplicates"]) == twins

        # the same requests again (another config, retry_failed on): not asked, not back
        asked = server.stats()["requests"]
        cfg["output"]["shard_rows"] = 1000
        cfg["generation"]["retry_failed"] = True
        cfg["publish"] = {"min_documents": 0}
        second = run_flow(write_config(cfg, "again.yaml"))
        assert server.stats()["requests"] == asked
    gen = read_manifest(second).counts.generate
    assert gen.failures.get("taken_down") == 1 + len(twins)
    texts = pq.read_table(second / "text").column("id").to_pylist()
    assert target not in texts
