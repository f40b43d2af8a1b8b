"""Export to S3 through moto's standalone server (the real HTTP S3 protocol) and to other
fsspec URLs; verify there; resume a killed export without re-sending finished parts."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import boto3
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from booksmith.flows.cli_shards import app
from booksmith.shards.export import MIN_PART_SIZE, export
from booksmith.shards.verify import verify
from booksmith.shards.version_dir import read_manifest
from tests.test_shards_dataset import make_version

pytestmark = pytest.mark.e2e


@pytest.fixture
def version(tmp_path: Path) -> Path:
    root = tmp_path / "out" / "20261126T000000Z"
    make_version(root, 40, encodings=["smollm2"], pack_seq_len=64)
    # a large file, so that the export takes the multipart path (3 parts of 5 MiB)
    (root / "report").mkdir()
    (root / "report" / "blob.bin").write_bytes(os.urandom(2 * MIN_PART_SIZE + 12345))
    return root


def test_export_to_s3_then_verify_and_read_back(version: Path, bucket: str) -> None:
    url = f"s3://{bucket}/datasets/v1"
    report = export(version, url, part_size=MIN_PART_SIZE, workers=4)
    assert report.parts_uploaded == 3 and not report.skipped
    s3 = boto3.client("s3")
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"]}
    manifest = read_manifest(version)
    assert {f"datasets/v1/{s.path}" for s in manifest.shards} <= keys
    assert {"datasets/v1/manifest.json", "datasets/v1/README.md"} <= keys
    # sha256 in each object's metadata, equal to the manifest's
    for s in manifest.shards:
        head = s3.head_object(Bucket=bucket, Key=f"datasets/v1/{s.path}")
        assert head["Metadata"]["sha256"] == s.sha256
    head = s3.head_object(Bucket=bucket, Key="datasets/v1/report/blob.bin")
    assert "-3" in head["ETag"]  # a multipart ETag: not an MD5 of the object

    checked = verify(url)
    assert checked.ok, checked.problems
    assert checked.round_trips > 0

    # pyarrow's own S3 filesystem (it ignores AWS_ENDPOINT_URL: pass endpoint_override)
    from pyarrow import fs as pafs

    s3fs = pafs.S3FileSystem(
        endpoint_override=os.environ["AWS_ENDPOINT_URL"],
        access_key="testing",
        secret_key="testing",
        region="us-east-1",
        scheme="http",
    )
    table = pq.read_table(f"{bucket}/datasets/v1/text", filesystem=s3fs)
    assert table.num_rows == 40
    import polars as pl

    frame = pl.read_parquet(
        f"s3://{bucket}/datasets/v1/tokens/smollm2/*.parquet",
        storage_options={
            "aws_endpoint_url": os.environ["AWS_ENDPOINT_URL"],
            "aws_access_key_id": "testing",
            "aws_secret_access_key": "testing",
            "aws_region": "us-east-1",
            "aws_allow_http": "true",
        },
    )
    assert frame.height == 40

    # a rerun uploads nothing
    again = export(version, url, part_size=MIN_PART_SIZE)
    assert not again.uploaded and again.parts_uploaded == 0


def test_killed_export_resumes_parts_and_publishes_manifest_last(
    version: Path, bucket: str
) -> None:
    url = f"s3://{bucket}/v"
    sent: list[tuple[str, int]] = []

    def die_after_two(rel: str, part: int) -> None:
        sent.append((rel, part))
        if len(sent) == 2:
            raise KeyboardInterrupt("killed mid-upload")

    with pytest.raises(KeyboardInterrupt):
        export(version, url, part_size=MIN_PART_SIZE, workers=1, on_part=die_after_two)
    s3 = boto3.client("s3")
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", [])}
    assert "v/manifest.json" not in keys and "v/report/blob.bin" not in keys
    assert not verify(url).ok  # no manifest there: not a dataset yet
    state_files = list((version.parent / "_state" / "exports").glob("*.json"))
    assert len(state_files) == 1 and "upload_id" in state_files[0].read_text()

    resent: list[tuple[str, int]] = []
    report = export(
        version, url, part_size=MIN_PART_SIZE, on_part=lambda r, p: resent.append((r, p))
    )
    assert report.parts_reused == 2 and report.parts_uploaded == 1
    assert resent == [("report/blob.bin", 3)]
    assert verify(url).ok
    body = s3.get_object(Bucket=bucket, Key="v/report/blob.bin")["Body"].read()
    assert body == (version / "report" / "blob.bin").read_bytes()
    assert "upload_id" not in state_files[0].read_text()


def test_reexport_over_another_version_unpublishes_it_first(
    version: Path, bucket: str, tmp_path: Path
) -> None:
    url = f"s3://{bucket}/same"
    export(version, url, part_size=MIN_PART_SIZE)
    other = tmp_path / "out" / "other"
    make_version(other, 10)
    seen: list[bool] = []
    s3 = boto3.client("s3")

    def manifest_present(rel: str, part: int) -> None:  # only called for multipart parts
        keys = {o["Key"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"]}
        seen.append("same/manifest.json" in keys)

    (other / "big.bin").write_bytes(os.urandom(MIN_PART_SIZE + 1))
    report = export(other, url, part_size=MIN_PART_SIZE, on_part=manifest_present)
    assert seen and not any(seen)
    assert "text/part-00001.parquet" in report.deleted  # the old version's shards only
    assert read_manifest(other).run_id == "other"
    assert verify(url).ok


def test_corrupted_remote_object_fails_verify(version: Path, bucket: str) -> None:
    url = f"s3://{bucket}/c"
    export(version, url, part_size=MIN_PART_SIZE)
    key = "c/text/part-00001.parquet"
    s3 = boto3.client("s3")
    data = bytearray(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
    data[100] ^= 0xFF
    s3.put_object(Bucket=bucket, Key=key, Body=bytes(data))
    result = CliRunner().invoke(app, ["verify", url])
    assert result.exit_code == 1 and "text/part-00001.parquet" in result.stderr


def test_cli_export_to_s3_and_to_a_local_url(version: Path, bucket: str, tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(
        app, ["export", str(version), "--to", f"s3://{bucket}/cli", "--part-size-mb", "5"]
    )
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == f"s3://{bucket}/cli"

    target = tmp_path / "copy"
    result = runner.invoke(app, ["export", str(version), "--to", target.as_uri()])
    assert result.exit_code == 0, result.output
    assert verify(target).ok
    # the copy is a version on its own: paths are relative
    moved = tmp_path / "moved"
    shutil.move(str(target), moved)
    assert verify(moved).ok

    bad = runner.invoke(app, ["export", str(tmp_path / "nope"), "--to", f"s3://{bucket}/x"])
    assert bad.exit_code == 2 and "nope: no such file or directory" in bad.stderr
    no_bucket = runner.invoke(app, ["export", str(version), "--to", "s3://no-such-bucket/x"])
    assert no_bucket.exit_code == 2, no_bucket.output
    assert no_bucket.stderr.strip().splitlines() == [
        "error: --to: bucket 'no-such-bucket' does not exist; create it first "
        "(e.g. `aws s3 mb s3://no-such-bucket`) or fix the URL"
    ]


def test_export_targets_are_checked_before_anything_is_sent(
    version: Path, bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, write_config
) -> None:
    """Preflight of an export: each way an S3 target fails is one line naming the fix, from
    the CLI, the export flow's own check and a run's preflight (export.to), and no object is
    written anywhere."""
    from booksmith.generation import preflight
    from booksmith.schemas.config import load_config
    from booksmith.shards.reachable import export_target
    from tests.services import free_port

    assert export_target(f"s3://{bucket}/ok", "export.to") == []
    assert export_target(str(tmp_path / "local" / "copy"), "export.to") == []
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    assert export_target(str(blocker / "copy"), "--to") == [
        f"--to: {blocker} is a file, not a directory; choose another --to"
    ]
    # a run whose export.to names a missing bucket fails at its preflight
    cfg = load_config(write_config({"export": {"to": "s3://missing-bucket/nightly"},
                                    "output": {"dir": str(tmp_path / "out")}}))  # fmt: skip
    assert [p for p in preflight.preflight(cfg) if p.startswith("export.to")] == [
        "export.to: bucket 'missing-bucket' does not exist; create it first "
        "(e.g. `aws s3 mb s3://missing-bucket`) or fix the URL"
    ]
    # no credentials at all (and no instance metadata to ask)
    with monkeypatch.context() as m:
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE"):
            m.delenv(name, raising=False)
        m.setenv("AWS_EC2_METADATA_DISABLED", "true")
        m.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
        m.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
        (line,) = export_target(f"s3://{bucket}/x", "export.to")
        assert line.startswith(f"export.to: no S3 credentials for s3://{bucket}/x; set ")
    # an endpoint that does not answer
    with monkeypatch.context() as m:
        m.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
        (line,) = export_target(f"s3://{bucket}/x", "export.to")
        assert line.startswith("export.to: S3 at http://127.0.0.1:") and "does not answer" in line
    # the export flow checks too: its run fails with the same line as its state message
    from booksmith.flows.export import export_flow

    with pytest.raises(ValueError, match=r"to: bucket 'missing-bucket' does not exist"):
        export_flow.fn(str(version), "s3://missing-bucket/x")
    listed = boto3.client("s3").list_objects_v2(Bucket=bucket)
    assert listed.get("KeyCount", 0) == 0  # nothing was sent by any of the above


@pytest.mark.slow
def test_sigkilled_cli_export_resumes(tmp_path: Path, bucket: str) -> None:
    """A real `kill -9` in the middle of a multipart upload, then the same command again."""
    root = tmp_path / "out" / "big"
    make_version(root, 10)
    (root / "report").mkdir()
    (root / "report" / "blob.bin").write_bytes(os.urandom(12 * MIN_PART_SIZE))
    url = f"s3://{bucket}/k"
    cmd = [sys.executable, "-m", "booksmith.flows.cli_shards", "export", str(root), "--to", url]
    cmd += ["--part-size-mb", "5", "--workers", "1"]
    s3 = boto3.client("s3")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        parts: list[dict[str, object]] = []
        deadline = time.monotonic() + 60
        while not parts and time.monotonic() < deadline and proc.poll() is None:
            uploads = s3.list_multipart_uploads(Bucket=bucket).get("Uploads", [])
            if uploads:
                up = uploads[0]
                parts = s3.list_parts(Bucket=bucket, Key=up["Key"], UploadId=up["UploadId"]).get(
                    "Parts", []
                )
            time.sleep(0.01)
        assert proc.poll() is None, "the export finished before it could be killed"
        proc.kill()
    finally:
        proc.kill()
        proc.wait()
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", [])}
    assert "k/manifest.json" not in keys
    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    resumed = re.search(r"(\d+)\s+parts\s+resumed", rerun.stderr)
    assert resumed and int(resumed.group(1)) >= len(parts), rerun.stderr
    assert verify(url).ok


def test_export_through_a_pyarrow_filesystem(version: Path, tmp_path: Path) -> None:
    from booksmith.shards import export as export_mod
    from booksmith.shards.fs import arrow_filesystem, filesystem

    fs, _ = arrow_filesystem((tmp_path / "arrow").as_uri())
    assert type(fs).__name__ == "ArrowFSWrapper"
    with pytest.raises(ValueError, match="no filesystem reaches"):
        filesystem("nosuchscheme://bucket/x")

    class ArrowTarget(export_mod._FsTarget):
        def __init__(self, url: str) -> None:
            self.fs, self.root = arrow_filesystem(url)

    monkey = pytest.MonkeyPatch()
    monkey.setattr(export_mod, "_FsTarget", ArrowTarget)
    try:
        export(version, (tmp_path / "arrow").as_uri())
    finally:
        monkey.undo()
    assert verify(tmp_path / "arrow").ok


def test_commands_on_an_export_url(version: Path, bucket: str, tmp_path: Path) -> None:
    """`datasets list s3://...` lists the exported versions (read through fsspec), `verify`
    checks one there; commands that change versions in place (rm, takedown) and `report`
    (which writes report/ into the version) refuse a URL with one line."""
    from booksmith.flows.cli import app as booksmith

    runner = CliRunner()
    second = tmp_path / "out" / "20261127T000000Z"
    make_version(second, 10)
    for v in (version, second):
        assert export(v, f"s3://{bucket}/nightly/{v.name}").url
    listed = runner.invoke(booksmith, ["datasets", "list", f"s3://{bucket}/nightly", "--json"])
    assert listed.exit_code == 0, listed.output
    rows = [json.loads(line) for line in listed.stdout.splitlines()]
    assert [r["run_id"] for r in rows] == [version.name, second.name]
    assert [r["documents"] for r in rows] == [40, 10]
    url = f"s3://{bucket}/nightly/{version.name}"
    assert runner.invoke(booksmith, ["verify", url]).exit_code == 0
    for args in (["datasets", "rm", f"s3://{bucket}/nightly", version.name],
                 ["datasets", "takedown", f"s3://{bucket}/nightly", "doc-1"]):  # fmt: skip
        refused = runner.invoke(booksmith, args)
        assert refused.exit_code == 2, (args, refused.output)
        (line,) = refused.output.strip().splitlines()
        assert line.startswith(f"error: s3://{bucket}/nightly") and "local" in line, line


def test_corpus_on_an_export_url(version: Path, bucket: str, tmp_path: Path) -> None:
    """`datasets corpus s3://...` unions the exported versions' token shards, read through
    fsspec like `datasets list`; a version not there is one line that lists what is."""
    from booksmith.flows.cli import app as booksmith
    from booksmith.shards.catalog import corpus

    second = tmp_path / "out" / "20261127T000000Z"
    make_version(second, 10, encodings=["smollm2"])
    root = f"s3://{bucket}/nightly"
    for v in (version, second):
        export(v, f"{root}/{v.name}")
    runner = CliRunner()
    shown = runner.invoke(booksmith, ["datasets", "corpus", root, "--encoding", "smollm2"])
    assert shown.exit_code == 0, shown.output
    view = json.loads(shown.stdout)
    assert view["versions"] == [version.name, second.name] and view["documents"] == 50
    assert view["files"] and all(f.startswith(f"{root}/") for f in view["files"])
    table = corpus(root, "smollm2").dataset().to_table()
    assert table.num_rows == 50 and sum(map(len, table["input_ids"].to_pylist())) == view["tokens"]
    with pytest.raises(ValueError, match="where it was exported from, then export it again"):
        corpus(root, "o200k_base")
    one = runner.invoke(booksmith, ["datasets", "corpus", root, "--version", second.name])
    assert one.exit_code == 0 and json.loads(one.stdout)["documents"] == 10
    missing = runner.invoke(
        booksmith, ["datasets", "corpus", root, "--version", "20990101T000000Z"]
    )
    assert missing.exit_code == 2
    (line,) = missing.output.strip().splitlines()
    assert f"{root}/20990101T000000Z: no such dataset version there" in line
    assert f"{version.name}, {second.name}" in line


def test_report_on_an_export_url(version: Path, bucket: str, tmp_path: Path) -> None:
    """`booksmith report s3://...` reads the exported version through fsspec and writes its
    report to a local folder (never into the export): the same report as the local version's."""
    from booksmith.flows.cli import app as booksmith

    url = f"s3://{bucket}/nightly/{version.name}"
    export(version, url)
    before = {o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket=bucket)["Contents"]}
    runner = CliRunner()
    local = runner.invoke(booksmith, ["report", str(version)])
    assert local.exit_code == 0, local.output
    remote = runner.invoke(booksmith, ["report", url, "--out", str(tmp_path / "r")])
    assert remote.exit_code == 0, remote.output
    assert (tmp_path / "r" / "report.md").read_text() == (
        version / "report" / "report.md"
    ).read_text()
    after = {o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket=bucket)["Contents"]}
    assert after == before  # nothing written to the export
    missing = runner.invoke(booksmith, ["report", f"s3://{bucket}/nightly/nope"])
    assert missing.exit_code == 2 and "no manifest" in missing.output
