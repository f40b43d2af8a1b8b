"""The compose stack's wiring, run natively: a Prefect server from the installed package,
redis-server for the shared MinHash index, moto's S3 server for the object store, and the
deterministic fake LLM server. Two nightly runs go through all of them."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import boto3
import pytest

from booksmith.filters.dedup import RedisIndex
from booksmith.shards.version_dir import list_versions, read_manifest
from tests.conftest import fake_backend_config
from tests.fakeserver import FakeServer
from tests.services import moto_s3, prefect_server, redis_server

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[1]


async def _flow_runs(api: str) -> list[tuple[str, str]]:
    from prefect.client.orchestration import PrefectClient

    async with PrefectClient(api) as client:
        runs = await client.read_flow_runs()
        flows = {f.id: f.name for f in await client.read_flows()}
    return [(flows[r.flow_id], r.state_type.value if r.state_type else "") for r in runs]


def test_nightly_runs_through_prefect_redis_and_s3(tmp_path: Path, write_config) -> None:
    with (
        prefect_server(tmp_path / "prefect-home") as api,
        redis_server() as redis_url,
        moto_s3() as s3_url,
        FakeServer() as llm,
    ):
        aws = {
            "AWS_ENDPOINT_URL": s3_url,
            "AWS_ACCESS_KEY_ID": "booksmith",
            "AWS_SECRET_ACCESS_KEY": "booksmith-secret",
            "AWS_DEFAULT_REGION": "us-east-1",
        }
        boto3.client("s3", endpoint_url=s3_url, **_creds(aws)).create_bucket(Bucket="booksmith")
        out = tmp_path / "out"
        cfg = fake_backend_config(llm.base_url, out)
        cfg["dedup"] = {"index": "redis", "redis_url": redis_url, "redis_basename": "nightly"}
        cfg["export"] = {"to": "s3://booksmith/nightly"}
        # the second run keeps nothing (all duplicates): published anyway, to read its counts
        cfg["publish"] = {"min_documents": 0}
        env = {**os.environ, **aws, "PREFECT_API_URL": api}

        def run(config: Path) -> Path:
            result = subprocess.run(
                [sys.executable, "-m", "booksmith", "run", "--config", str(config)],
                cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
            )  # fmt: skip
            assert result.returncode == 0, result.stderr[-3000:]
            return Path(result.stdout.strip().splitlines()[-1])

        first = run(write_config(cfg))
        # The same plan again under another config (the same config and seed would be a no-op
        # naming the first version): every document is already in the Redis index.
        cfg["output"]["shard_rows"] = 1000
        second = run(write_config(cfg, "second.yaml"))
        assert second != first

        # the runs are on this Prefect server
        assert sorted(asyncio.run(_flow_runs(api))) == [("booksmith-nightly", "COMPLETED")] * 2
        # the index holds the first run's documents, tagged with its run id
        index = RedisIndex(redis_url, "nightly")
        kept = read_manifest(first).documents
        assert kept > 0 and index.runs()[first.name] == kept
        assert index.runs().get(second.name, 0) == 0
        assert read_manifest(second).counts.filter["dedup_exact"]["dedup_exact"] == kept
        index.close()
        # both versions are in the bucket, manifest included, and verify there
        s3 = boto3.client("s3", endpoint_url=s3_url, **_creds(aws))
        keys = {o["Key"] for o in s3.list_objects_v2(Bucket="booksmith")["Contents"]}
        for version in list_versions(out):
            assert f"nightly/{version.name}/manifest.json" in keys
            check = subprocess.run(
                [sys.executable, "-m", "booksmith", "verify", f"s3://booksmith/nightly/{version.name}"],
                cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
            )  # fmt: skip
            assert check.returncode == 0, check.stderr[-2000:]


def _creds(aws: dict[str, str]) -> dict[str, str]:
    return {
        "aws_access_key_id": aws["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": aws["AWS_SECRET_ACCESS_KEY"],
        "region_name": aws["AWS_DEFAULT_REGION"],
    }
