"""A grounded run's key names what its sources hold (pipeline/checkpoint.py, Source.fingerprint):
the same sources give the same key, a source file edited in place (locally or in S3) gives
another, a dataset version used as a source is named by its manifest, a run without sources
keeps the key it had before sources existed, and a run rerun after its source was edited is
not a no-op on the stale content (fake server)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from booksmith.filters.sources import Source
from booksmith.pipeline.checkpoint import run_key
from booksmith.schemas import TopicSeed
from booksmith.schemas.config import RunConfig
from booksmith.schemas.grounding_settings import SourceSpec
from booksmith.shards.version_dir import list_versions, read_manifest
from tests.conftest import fake_backend_config
from tests.fakeserver import FakeServer
from tests.test_grounded_plan import TOPICS, write_source


def _key(*paths: Path | str, seed: int = 3) -> str:
    cfg = RunConfig.model_validate({"sources": [{"path": str(p)} for p in paths]})
    return run_key(cfg, seed, [])


def test_a_run_without_sources_keeps_its_key_and_reads_no_source(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def refuse(self: Source) -> str:
        raise AssertionError("a topic-only run fingerprints no source")

    monkeypatch.setattr(Source, "fingerprint", refuse)
    cfg = RunConfig()
    seeds = [TopicSeed(topic="Fractions", subject="mathematics")]
    # the key as it was before sources existed: config hash, seed, the seed topics' JSON
    topics = hashlib.sha256(b"".join(t.model_dump_json().encode() + b"\n" for t in seeds))
    before = f"{cfg.config_hash()}:9:{topics.hexdigest()}"
    assert run_key(cfg, 9, seeds) == hashlib.sha256(before.encode()).hexdigest()[:24]


def test_a_source_file_edited_in_place_changes_the_key(tmp_path: Path) -> None:
    source = write_source(tmp_path / "pydoc.jsonl")
    first = _key(source)
    assert _key(source) == first  # the same file, untouched: the same run
    assert _key(source, seed=4) != first
    stat = source.stat()
    with source.open("a", encoding="utf-8") as f:  # one record more, written in place
        f.write('{"id": "extra", "text": "An added record."}\n')
    os.utime(source, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # even with its old mtime
    edited = _key(source)
    assert edited != first
    # the same size, another modification time (an edit that kept the length)
    os.utime(source, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert _key(source) not in (first, edited)


def test_a_folder_source_is_named_by_each_of_its_files(tmp_path: Path) -> None:
    folder = tmp_path / "corpus"
    folder.mkdir()
    write_source(folder / "a.jsonl")
    first = _key(folder)
    assert _key(folder) == first
    write_source(folder / "b.jsonl")  # a file added to the folder
    assert _key(folder) != first


def test_a_source_in_s3_rewritten_changes_the_key(tmp_path: Path, bucket: str) -> None:
    import boto3

    s3 = boto3.client("s3")
    s3.upload_file(str(write_source(tmp_path / "pydoc.jsonl")), bucket, "corpora/pydoc.jsonl")
    url = f"s3://{bucket}/corpora/pydoc.jsonl"
    first = _key(url)
    assert _key(url) == first
    one = next(iter(TOPICS.items()))
    body = f'{{"id": "{one[0]}", "text": "Another text of the same record."}}\n'
    s3.put_object(Bucket=bucket, Key="corpora/pydoc.jsonl", Body=body.encode())
    assert _key(url) != first


@pytest.fixture(scope="module")
def server() -> Iterator[FakeServer]:
    with FakeServer({}) as s:
        yield s


def _run(server: FakeServer, out: Path, source: Path | str, write_config: Any) -> Path:
    from booksmith.flows.nightly import nightly
    from booksmith.flows.task_runners import with_runner
    from booksmith.schemas.config import load_config

    data = fake_backend_config(server.base_url, out)
    data.update(seed=3, sources=[{"path": str(source)}], plan={"limit": 4},
                fill={"documents": None}, publish={"min_documents": 0})  # fmt: skip
    config = write_config(data)
    return Path(with_runner(nightly, load_config(config))(config=str(config)))


def test_a_rerun_after_the_source_was_edited_is_not_a_no_op(
    server: FakeServer, tmp_path: Path, write_config: Any
) -> None:
    source = write_source(tmp_path / "pydoc.jsonl")
    out = tmp_path / "out"
    first = _run(server, out, source, write_config)
    assert _run(server, out, source, write_config) == first  # untouched: a no-op
    assert len(list_versions(out)) == 1
    write_source(source, copies=2)  # the file edited in place: more records
    second = _run(server, out, source, write_config)
    assert second != first and len(list_versions(out)) == 2
    assert read_manifest(second).run_key != read_manifest(first).run_key
    # that version, as a source, is named by its manifest (which lists every shard's sha256):
    # touching a shard's time changes nothing, another manifest changes the key
    key = _key(second)
    assert Source(SourceSpec(path=str(second))).fingerprint().startswith("manifest:")
    os.utime(next((second / "text").iterdir()), ns=(0, 0))
    assert _key(second) == key
    with (second / "manifest.json").open("a", encoding="utf-8") as f:
        f.write("\n")
    assert _key(second) != key
