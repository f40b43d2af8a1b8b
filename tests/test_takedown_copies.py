"""A takedown reaches every copy (issue 20, point 2): after a real run with near-duplicates,
its `datasets bin` outputs and its exports (S3 on moto's real HTTP server, a local folder) are
recorded; `takedown --dry-run` lists each and changes nothing; `takedown --yes` leaves the
taken-down texts nowhere: not in any file under the output directory (Parquet read back,
SQLite and its WAL byte for byte), the S3 copy, the local copy, the bin outputs (decoded), or
a rerun of the same plan. A copy it cannot reach is listed and the command exits 1; the next
takedown writes it again."""

from __future__ import annotations

import hashlib
import io
import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import numpy as np
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner, Result

from booksmith.flows.cli import app
from booksmith.generation.diversity import openers
from booksmith.shards.verify import verify
from booksmith.shards.version_dir import read_manifest
from tests.conftest import fake_backend_config
from tests.fakeserver import FakeServer
from tests.test_shards_dataset import make_version

pytestmark = pytest.mark.slow

Files = Iterator[tuple[str, bytes]]


def invoke(*args: object, code: int = 0) -> Result:
    """Run the CLI, expecting exit `code`."""
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == code, (args, result.output)
    return result


def last_json(result: Result) -> dict[str, Any]:
    """The JSON line a takedown prints last on stdout."""
    return dict(json.loads(result.stdout.splitlines()[-1]))


def needles(text: str) -> list[bytes]:
    """Runs of 8 words from the start, middle and end: one of them anywhere shows the text."""
    words = text.split()
    starts = {0, max(0, len(words) // 2 - 4), max(0, len(words) - 8)}
    return [" ".join(words[i : i + 8]).encode() for i in sorted(starts)]


def readable(data: bytes) -> bytes:
    """A file as its text can be found in it: a Parquet file decoded, anything else raw."""
    if data[:4] == b"PAR1":
        return json.dumps(pq.read_table(io.BytesIO(data)).to_pylist(), default=str).encode()
    return data


def local_files(root: Path) -> Files:
    for path in sorted(root.rglob("*")):
        if path.is_file():
            yield str(path), path.read_bytes()


def s3_files(bucket: str) -> Files:
    s3 = boto3.client("s3")
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for obj in page.get("Contents", []):
            body = s3.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()
            yield f"s3://{bucket}/{obj['Key']}", body


def bin_text(folder: Path) -> Files:
    """The bin outputs' token stream decoded back to text (smollm2), one name per folder."""
    from booksmith.shards.encodings import get_encoding

    enc = get_encoding("smollm2")
    tokens = bin_tokens(folder)
    yield str(folder), enc.decode(tokens).encode()


def bin_tokens(folder: Path) -> list[int]:
    tokens: list[int] = []
    for path in sorted(folder.glob("*.bin")):
        offset = 1024 if path.name != "train.bin" else 0  # llm.c's header
        tokens += np.fromfile(path, dtype="<u2", offset=offset).tolist()
    return tokens


def found(files: Files, texts: list[str]) -> list[str]:
    """Names of the files that hold any of the texts."""
    wanted = [n for t in texts for n in needles(t)]
    return [name for name, data in files if any(n in readable(data) for n in wanted)]


def snapshot(root: Path, bucket: str) -> dict[str, str]:
    files = [*local_files(root), *s3_files(bucket)]
    return {name: hashlib.sha256(data).hexdigest() for name, data in files}


def run_flow(config: Path) -> Path:
    from booksmith.flows.nightly import nightly

    return Path(nightly(config=str(config)))


def near_duplicated(version: Path) -> tuple[str, set[str]]:
    """A kept document with rejected near-duplicates, and their ids."""
    near = [r for r in pq.read_table(version / "rejected").to_pylist() if r["duplicate_of"]]
    assert near, "the fake server made no near-duplicates"
    target = near[0]["duplicate_of"]
    return target, {r["id"] for r in near if r["duplicate_of"] == target}


def texts_of(version: Path, ids: set[str]) -> list[str]:
    rows = pq.read_table(version / "text").to_pylist()
    rows += pq.read_table(version / "rejected").to_pylist()
    return [r["text"] for r in rows if r["id"] in ids]


def test_takedown_reaches_every_copy(
    prefect_api: str, bucket: str, tmp_path: Path, write_config
) -> None:
    out, bins, mirror = tmp_path / "out", tmp_path / "bins", tmp_path / "mirror"
    with FakeServer({"near_duplicate": 0.5, "near_duplicate_pool": 2}) as server:
        cfg = fake_backend_config(server.base_url, out)
        cfg["output"]["encodings"] = ["smollm2"]
        first = run_flow(write_config(cfg))
        target, twins = near_duplicated(first)
        texts = texts_of(first, {target, *twins})
        assert len(texts) == 1 + len(twins)
        (opener,) = openers(texts_of(first, {target}))  # its first words, in the report
        assert opener in dict(read_manifest(first).diversity.top_openers)
        before, gone = read_manifest(first), rows_of(first, {target, *twins})
        places = make_copies(first, bins, mirror, bucket)
        # the search sees the texts in every place before the takedown
        assert any("responses.sqlite" in f for f in found(local_files(out), texts))
        for files in (s3_files(bucket), local_files(mirror), bin_text(bins / "llmc"),
                      bin_text(bins / "nanogpt")):  # fmt: skip
            assert found(files, texts)
        dry_run_changes_nothing(out, tmp_path, bucket, target, places)

        done = invoke("datasets", "takedown", out, target, "--yes")
        result = last_json(done)
        assert result["unreached"] == [] and len(result["rewritten"]) == 4
        assert result["index_flagged"] == 1
        assert found(local_files(out), texts) == []
        assert opener not in dict(read_manifest(first).diversity.top_openers)
        check_figures(first, before, gone)
        assert f"`{opener}`" not in (first / "report" / "report.md").read_text()
        assert found(local_files(mirror), texts) == []
        assert found(s3_files(bucket), texts) == []
        assert verify(f"s3://{bucket}/nightly/{first.name}").ok
        check_bins(first, bins)
        from booksmith.filters.dedup import FileIndex

        assert FileIndex(out / "_state" / "minhash").taken_down() == {target: first.name}

        # the same plan again (another config, retry_failed on): nothing asked, nothing back
        asked = server.stats()["requests"]
        cfg["generation"]["retry_failed"] = True
        cfg["publish"] = {"min_documents": 0}
        run_flow(write_config(cfg, "again.yaml"))
        assert server.stats()["requests"] == asked
    assert found(local_files(out), texts) == []


def rows_of(version: Path, ids: set[str]) -> dict[str, list[dict[str, Any]]]:
    return {kind: [r for r in pq.read_table(version / kind).to_pylist() if r["id"] in ids]
            for kind in ("text", "rejected")}  # fmt: skip


def check_figures(version: Path, before: Any, gone: dict[str, list[dict[str, Any]]]) -> None:
    """The manifest's figures of what the version holds lose exactly the rows taken down: kept
    count, languages, the axes' coverage, the quality histogram; the text metrics are those of
    the documents left."""
    from booksmith.generation.diversity import distinct_n

    after = read_manifest(version)
    n = len(gone["text"])
    assert n and after.documents == after.counts.kept == before.documents - n
    assert after.diversity.documents == before.diversity.documents - n
    assert sum(after.languages.values()) == after.documents
    for axis, cov in before.diversity.axis_coverage.items():
        lost = Counter(r[axis] for r in gone["text"])
        assert after.diversity.axis_coverage[axis].counts == {
            v: c - lost[v] for v, c in cov.counts.items()}  # fmt: skip
    for kind, name in (("text", "kept"), ("rejected", "rejected")):
        lost = Counter(min(9, int(r["quality_score"] * 10)) for r in gone[kind]
                       if r["quality_score"] is not None)  # fmt: skip
        want = [c - lost[i] for i, c in enumerate(getattr(before.quality, name))]
        assert getattr(after.quality, name) == want, kind
    left = pq.read_table(version / "text").column("text").to_pylist()
    assert after.diversity.distinct_1 == round(distinct_n(left, 1), 4)
    assert after.diversity.distinct_1 != before.diversity.distinct_1


def make_copies(version: Path, bins: Path, mirror: Path, bucket: str) -> set[str]:
    """Two bin outputs and two exports of `version`, each recorded; returns their places."""
    invoke("datasets", "bin", version, "--out", bins / "llmc", "--shard-tokens", 700)
    invoke("datasets", "bin", version, "--out", bins / "nanogpt", "--format", "nanogpt")
    s3_url = f"s3://{bucket}/nightly/{version.name}"
    invoke("export", version, "--to", s3_url)
    invoke("export", version, "--to", mirror / version.name)
    copies = json.loads((version.parent / "_state" / "copies.json").read_text())["copies"]
    places = {str(bins / "llmc"), str(bins / "nanogpt"), s3_url, (mirror / version.name).as_uri()}
    assert {c["place"] for c in copies} == places
    assert {c["version"] for c in copies} == {version.name}
    (llmc,) = [c for c in copies if c["place"] == str(bins / "llmc")]
    assert (llmc["kind"], llmc["encoding"], llmc["format"], llmc["shard_tokens"]) == (
        "bin", "smollm2", "llmc", 700)  # fmt: skip
    assert llmc["files"] == sorted(p.name for p in (bins / "llmc").iterdir())
    return places


def dry_run_changes_nothing(
    out: Path, root: Path, bucket: str, target: str, places: set[str]
) -> None:
    before = snapshot(root, bucket)
    dry = invoke("datasets", "takedown", out, target, "--dry-run")
    plan = last_json(dry)
    assert {c["place"] for c in plan["copies"]} == places
    assert plan["indexes"] == [str(out / "_state" / "minhash")]
    for place in (*places, "MinHash index", "response cache", "report regenerated"):
        assert place in dry.stderr, place  # the lines for people, beside the JSON
    assert snapshot(root, bucket) == before


def check_bins(version: Path, bins: Path) -> None:
    """The bin outputs are the new version's token stream, with no shard left over."""
    stream = [t for r in pq.read_table(version / "tokens/smollm2")["input_ids"].to_pylist()
              for t in r]  # fmt: skip
    assert bin_tokens(bins / "nanogpt") == stream
    assert bin_tokens(bins / "llmc") == stream
    assert len(list((bins / "llmc").glob("*.bin"))) == -(-len(stream) // 700)


def test_a_copy_out_of_reach_is_listed_exit_1_and_written_by_the_next_takedown(
    bucket: str, tmp_path: Path
) -> None:
    from booksmith.shards.binexport import export_bin
    from booksmith.shards.export import export

    out = tmp_path / "out"
    version = out / "20261124T020000Z"
    make_version(version, 30, encodings=["smollm2"])
    url = f"s3://{bucket}/v"
    export(version, url)
    export_bin(version, tmp_path / "bin", shard_tokens=500)
    gone = "20261124T020000Z-00003"
    (text,) = [r["text"] for r in pq.read_table(version / "text").to_pylist() if r["id"] == gone]
    s3 = boto3.resource("s3")
    s3.Bucket(bucket).objects.all().delete()
    s3.Bucket(bucket).delete()

    failed = invoke("datasets", "takedown", out, gone, "--yes", code=1)
    (line,) = [x for x in failed.stderr.splitlines() if x.startswith("error: not reached:")]
    assert line.startswith(f"error: not reached: export {url}: target: bucket {bucket!r} does "
                           "not exist; create it first")  # fmt: skip
    result = last_json(failed)
    assert result["removed"] == {version.name: 1}
    assert result["rewritten"] == [f"bin output {tmp_path / 'bin'}"]
    assert found(bin_text(tmp_path / "bin"), [text]) == []

    # the bucket is back: the same takedown again has nothing to remove and writes the copy
    boto3.client("s3").create_bucket(Bucket=bucket)
    dry = invoke("datasets", "takedown", out, gone, "--dry-run")
    assert [c["place"] for c in last_json(dry)["copies"]] == [url]
    again = last_json(invoke("datasets", "takedown", out, gone, "--yes"))
    assert again["removed"] == {} and again["rewritten"] == [f"export {url}"]
    assert verify(url).ok
    assert read_manifest(version).documents == 29
    assert found(s3_files(bucket), [text]) == []


def test_a_killed_run_holding_the_document_is_listed_and_exit_1(
    prefect_api: str, tmp_path: Path, write_config
) -> None:
    """A run killed after its chunks were spilled (its answers from the cache, so the taken-down
    document is among them) would publish the text when resumed: the dry run names it, and
    the takedown lists it and exits 1."""
    from tests.test_crash import booksmith_run

    out = tmp_path / "out"
    with FakeServer() as server:
        cfg = fake_backend_config(server.base_url, out)
        first = run_flow(write_config(cfg))
        target = pq.read_table(first / "text").column("id")[0].as_py()
        cfg["output"]["shard_rows"] = 1000  # another config: not a rerun of a finished run
        killed = booksmith_run(write_config(cfg, "again.yaml"), prefect_api, "shards.manifest")
    assert killed.returncode == -9, killed.stderr[-2000:]
    (work,) = (out / "_state" / "runs").iterdir()
    dry = invoke("datasets", "takedown", out, target, "--dry-run")
    assert last_json(dry)["unfinished"] == {work.name: 1}
    assert f"not reachable: unfinished run {work.name}" in dry.stderr
    failed = invoke("datasets", "takedown", out, target, "--yes", code=1)
    (line,) = [x for x in failed.stderr.splitlines() if x.startswith("error: not reached:")]
    assert line.startswith(f"error: not reached: unfinished run {work.name} ({work}): its "
                           "spilled chunks hold 1 of these documents")  # fmt: skip
    assert last_json(failed)["removed"] == {first.name: 1}


def test_an_export_of_a_retired_version_is_checked_there(bucket: str, tmp_path: Path) -> None:
    """A version exported, then retired here: its copy cannot be written again, so a takedown
    reads it there; holding one of the documents, it is listed (dry run too) and exit 1."""
    from booksmith.shards.export import export

    out = tmp_path / "out"
    retired, kept = out / "20261124T020000Z", out / "20261125T020000Z"
    make_version(retired, 20)
    make_version(kept, 10)
    url = f"s3://{bucket}/a"
    export(retired, url)
    invoke("datasets", "rm", out, retired.name, "--yes")
    held = f"{retired.name}-00002"
    why = (f"export {url} of {retired.name}, a version no longer under {out}: it holds 1 of "
           "these documents and cannot be written again from here; delete that copy")  # fmt: skip
    dry = invoke("datasets", "takedown", out, held, "--dry-run")
    assert last_json(dry)["orphans"] == [why] and f"not reachable: {why}" in dry.stderr
    failed = invoke("datasets", "takedown", out, held, "--yes", code=1)
    assert f"error: not reached: {why}" in failed.stderr.splitlines()
    # a document the copy does not hold: nothing out of reach
    assert last_json(invoke("datasets", "takedown", out, f"{kept.name}-00001", "--yes"))[
        "unreached"] == []  # fmt: skip
