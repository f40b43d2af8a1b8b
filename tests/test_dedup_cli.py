"""`booksmith dedup` on user files and dataset versions, read back with pyarrow and DuckDB."""

from __future__ import annotations

import json
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from booksmith.filters import inputs
from booksmith.filters.dedup import FileIndex
from booksmith.flows.cli_dedup import app
from booksmith.schemas import Rejected
from booksmith.shards.dataset import InMemoryVersion, ShardLayout, write_version
from tests.dedup_corpus import make_corpus
from tests.test_dedup_core import doc
from tests.test_dedup_index import redis_url  # noqa: F401  (module fixture: a redis-server)

runner = CliRunner()
CORPUS = make_corpus(8, 0, words_per_doc=120, seed=4)
T = CORPUS.texts


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


def test_dedup_jsonl_keeps_ids_and_columns_verbatim(tmp_path: Path) -> None:
    rows = [
        {"id": 10, "text": T[0], "source": "web"},
        {"id": 11, "text": T[0].upper(), "source": "books"},
        {"id": 12, "text": T[1] + " and a few more words", "source": "web"},
        {"id": 13, "text": T[1], "source": "web"},
        {"id": 14, "text": T[2], "source": "forum"},
        {"id": 15, "text": None, "source": "web"},
    ]
    src = _jsonl(tmp_path / "corpus.jsonl", rows)
    result = runner.invoke(app, ["dedup", str(src), "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    kept = pq.read_table(tmp_path / "out" / "kept.parquet")
    assert kept.column("id").to_pylist() == [10, 12, 14, 15]
    assert kept.column("source").to_pylist() == ["web", "web", "forum", "web"]
    rejected = duckdb.sql(
        f"select id, reason, duplicate_of, source from '{tmp_path / 'out' / 'rejected.parquet'}'"
        " order by id"
    ).fetchall()
    assert rejected == [(11, "dedup_exact", "10", "books"), (13, "dedup_minhash", "12", "web")]


def test_dedup_parquet_against_an_index_and_commit(tmp_path: Path) -> None:
    index = tmp_path / "index"
    first = tmp_path / "first.parquet"
    pq.write_table(pa.table({"id": ["a", "b"], "text": [T[0], T[1]]}), first)
    out1 = tmp_path / "out1"
    args = ["dedup", str(first), "--out", str(out1), "--against", str(index)]
    missing = runner.invoke(app, args)
    assert missing.exit_code == 2 and "no dedup index" in missing.output
    result = runner.invoke(app, [*args, "--commit-as", "corpus-1"])
    assert result.exit_code == 0, result.output
    second = tmp_path / "second.parquet"
    pq.write_table(pa.table({"id": ["c", "d"], "text": [T[1] + " extra words", T[3]]}), second)
    out2 = tmp_path / "out2"
    result = runner.invoke(app, ["dedup", str(second), "--out", str(out2), "--against", str(index)])
    assert result.exit_code == 0, result.output
    assert pq.read_table(out2 / "kept.parquet").column("id").to_pylist() == ["d"]
    rejected = pq.read_table(out2 / "rejected.parquet").to_pylist()
    assert [(r["id"], r["reason"], r["duplicate_of"]) for r in rejected] == [
        ("c", "dedup_minhash", "b")
    ]
    shown = runner.invoke(app, ["dedup-index", "show", str(index)])
    assert shown.exit_code == 0 and "corpus-1\t2" in shown.output
    assert "taken down" not in shown.output
    removed = runner.invoke(app, ["dedup-index", "remove", str(index), "corpus-1"])
    assert removed.exit_code == 0, removed.output
    again = runner.invoke(app, ["dedup", str(second), "--out", str(out2), "--against", str(index)])
    assert again.exit_code == 0
    assert pq.read_table(out2 / "kept.parquet").num_rows == 2
    # a taken-down document: shown as such, and its entry outlives its run's removal
    result = runner.invoke(app, [*args, "--commit-as", "corpus-2"])
    assert result.exit_code == 0, result.output
    FileIndex(index).flag_taken_down(["b"])  # as `datasets takedown` does
    shown = runner.invoke(app, ["dedup-index", "show", str(index)])
    assert shown.stdout.splitlines() == ["corpus-2\t2", "taken down: b\tcorpus-2"]
    removed = runner.invoke(app, ["dedup-index", "remove", str(index), "corpus-2"])
    assert "removed 1 documents of run corpus-2" in removed.output
    shown = runner.invoke(app, ["dedup-index", "show", str(index)])
    assert shown.stdout.splitlines() == ["corpus-2\t1", "taken down: b\tcorpus-2"]
    again = runner.invoke(app, ["dedup", str(second), "--out", str(out2), "--against", str(index)])
    assert pq.read_table(out2 / "kept.parquet").column("id").to_pylist() == ["d"]


def test_dedup_against_redis(tmp_path: Path, redis_url: str) -> None:  # noqa: F811
    spec = f"{redis_url}?basename=cli"
    src = _jsonl(tmp_path / "a.jsonl", [{"id": "x", "text": T[5]}])
    ok = runner.invoke(
        app,
        ["dedup", str(src), "--out", str(tmp_path / "o1"), "--against", spec, "--commit-as", "r1"],
    )
    assert ok.exit_code == 0, ok.output
    src2 = _jsonl(tmp_path / "b.jsonl", [{"id": "y", "text": T[5] + " tail"}])
    ok = runner.invoke(app, ["dedup", str(src2), "--out", str(tmp_path / "o2"), "--against", spec])
    assert ok.exit_code == 0, ok.output
    (row,) = pq.read_table(tmp_path / "o2" / "rejected.parquet").to_pylist()
    assert (row["id"], row["duplicate_of"]) == ("y", "x")


def test_dedup_a_dataset_version(tmp_path: Path) -> None:
    docs = [doc("d1", T[0], 0.3), doc("d2", T[0] + " more", 0.9), doc("d3", T[6])]
    version = tmp_path / "20260101T000000Z"
    write_version(version, InMemoryVersion(version.name, docs), ShardLayout(shard_rows=2))
    result = runner.invoke(app, ["dedup", str(version), "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    kept = pq.read_table(tmp_path / "out" / "kept.parquet")
    assert kept.column("id").to_pylist() == ["d2", "d3"]  # the higher quality_score wins
    rejected = pq.read_table(tmp_path / "out" / "rejected.parquet")
    assert set(rejected.column_names) == set(Rejected.model_fields) - {"detail"}
    assert rejected.to_pylist()[0]["duplicate_of"] == "d2"


def test_user_errors_exit_2_with_one_line(tmp_path: Path) -> None:
    cases = {
        "noid.jsonl:1: no `id` field": _jsonl(tmp_path / "noid.jsonl", [{"text": "a"}]),
        "bad.jsonl:2: invalid JSON": tmp_path / "bad.jsonl",
        "appears twice": _jsonl(tmp_path / "dup.jsonl", [{"id": 1, "text": "a"}] * 2),
        "expected a dataset directory": tmp_path / "x.csv",
        "without manifest.json": tmp_path / "emptydir",
        "input not found (no such file": tmp_path / "nope.jsonl",
    }
    (tmp_path / "bad.jsonl").write_text('{"id": 1, "text": "a"}\n{oops\n')
    (tmp_path / "x.csv").write_text("id,text\n")
    (tmp_path / "emptydir").mkdir()
    for message, path in cases.items():
        result = runner.invoke(app, ["dedup", str(path), "--out", str(tmp_path / "o")])
        assert result.exit_code == 2, (message, result.output)
        assert message in result.output and len(result.output.strip().splitlines()) == 1
    corrupt = tmp_path / "corrupt-index"
    corrupt.mkdir()
    (corrupt / "index.json").write_text("{")
    src = _jsonl(tmp_path / "ok.jsonl", [{"id": 1, "text": "a b c"}])
    result = runner.invoke(
        app, ["dedup", str(src), "--out", str(tmp_path / "o"), "--against", str(corrupt)]
    )
    assert result.exit_code == 2 and "corrupt index manifest" in result.output
    assert (corrupt / "index.json").read_text() == "{"


def test_dedup_streams_batches_with_the_in_memory_verdicts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Batches of 7 records: the same verdicts as the engine over the whole file, clusters
    spanning batches, a later record with a better score kept over an earlier one."""
    import random

    from booksmith.filters.dedup import DedupSettings, find_duplicates

    rng = random.Random(5)
    corpus = make_corpus(30, 0, words_per_doc=120, seed=9).texts
    rows = []
    for i in range(160):
        base = corpus[rng.randrange(len(corpus))].split()
        if rng.random() < 0.5:
            base[rng.randrange(len(base))] = "zebra"  # a near duplicate
        rows.append({"id": f"r{i}", "text": " ".join(base), "quality_score": rng.random()})
    src = _jsonl(tmp_path / "big.jsonl", rows)
    monkeypatch.setattr(inputs, "BATCH_ROWS", 7)
    result = runner.invoke(app, ["dedup", str(src), "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    want = find_duplicates(
        [r["id"] for r in rows], [r["text"] for r in rows], [r["quality_score"] for r in rows],
        DedupSettings(),
    )  # fmt: skip
    kept = pq.read_table(tmp_path / "out" / "kept.parquet").column("id").to_pylist()
    assert kept == [r["id"] for r, v in zip(rows, want, strict=True) if v is None]
    rejected = pq.read_table(tmp_path / "out" / "rejected.parquet").to_pylist()
    assert [(r["id"], r["reason"], r["duplicate_of"]) for r in rejected] == [
        (r["id"], v.reason, v.duplicate_of) for r, v in zip(rows, want, strict=True) if v
    ]
    position = {r["id"]: i for i, r in enumerate(rows)}
    assert any(position[r["duplicate_of"]] // 7 > position[r["id"]] // 7 for r in rejected)
    assert {r["reason"] for r in rejected} == {"dedup_exact", "dedup_minhash"}

    rows[20]["extra"] = 1  # a column the first batch did not have
    bad = _jsonl(tmp_path / "bad.jsonl", rows)
    failed = runner.invoke(app, ["dedup", str(bad), "--out", str(tmp_path / "bad")])
    assert failed.exit_code == 2 and f"{bad}:21:" in failed.output and "extra" in failed.output
    assert not (tmp_path / "bad" / "kept.parquet").exists()
