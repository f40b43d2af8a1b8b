"""`booksmith quality annotate|train` and `booksmith filter` end to end: a judge server behind
the generation client (cache, retries), a trained model, kept and rejected Parquet files read
back with DuckDB, and one-line errors for bad input."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import duckdb
import pyarrow.parquet as pq
import pytest
import typer
import yaml
from typer.testing import CliRunner

from booksmith.filters.annotate import parse_score
from booksmith.filters.retrain import retrain_due
from booksmith.flows import cli_quality
from booksmith.shards.dataset import InMemoryVersion, ShardLayout, write_version
from tests.conftest import fake_backend_config
from tests.fakeserver import FakeServer
from tests.filters_helpers import LABELLED, MMLU, TEXTBOOK, make_doc
from tests.judge import judge_server

app = typer.Typer()
app.add_typer(cli_quality.quality_app, name="quality")
app.command("filter")(cli_quality.filter_command)
runner = CliRunner()

LABELS = {row["text"]: row["score"] for row in map(json.loads, LABELLED.read_text().splitlines())}


@pytest.fixture
def judge() -> Iterator[str]:
    # A stand-in for a strong model: it knows the fixture's labels.
    with judge_server(lambda extract: int(LABELS.get(extract, 2))) as (url, _):
        yield url


def _config(tmp_path: Path, base_url: str, **generation: Any) -> Path:
    path = tmp_path / "config.yaml"
    data = fake_backend_config(base_url, tmp_path / "out", **generation)
    path.write_text(yaml.safe_dump(data))
    return path


def _jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_parse_score() -> None:
    assert parse_score("Good text.\nEducational score: 4") == 4
    assert parse_score("Educational Score: **3** points") == 3
    assert parse_score("score: 1 ... final educational score - 5") == 5
    assert parse_score("I think it deserves a 4.") is None
    assert parse_score("Educational score: 9") is None


def test_annotate_through_the_generation_client_with_faults_and_cache(tmp_path: Path) -> None:
    docs = _jsonl(
        tmp_path / "docs.jsonl", [{"id": f"d{i}", "text": f"{TEXTBOOK} {i}"} for i in range(10)]
    )
    with FakeServer({"rate_limit": 0.3, "bad_request": 0.1}) as server:
        config = _config(tmp_path, server.base_url)
        result = runner.invoke(app, ["quality", "annotate", str(docs), "--config", str(config),
                                     "--sample", "6", "--max-tokens", "32"])  # fmt: skip
        assert result.exit_code == 0, result.output
        target = tmp_path / "out" / "_state" / "quality" / "annotations.parquet"
        assert result.stdout.strip().splitlines()[-1] == str(target)
        rows = pq.read_table(target).to_pylist()
        assert len(rows) == 6 and {r["id"] for r in rows} <= {f"d{i}" for i in range(10)}
        # The fake server writes words, not scores: kept with their error, never dropped.
        assert all(r["error"] in ("no_score_in_reply", "http_400") for r in rows)
        assert all(r["judge"] == "fake-model" and r["rubric_version"] for r in rows)
        before = server.stats()["requests"]
        again = runner.invoke(app, ["quality", "annotate", str(docs), "--config", str(config),
                                    "--sample", "6", "--max-tokens", "32"])  # fmt: skip
        assert again.exit_code == 0, again.output
        assert server.stats()["requests"] == before  # all from the response cache
        assert pq.read_table(target).num_rows == 6  # merged by id, not appended


@pytest.mark.parametrize("structured_output", [True, False])
def test_the_judge_answers_structured_or_falls_back_to_plain(
    tmp_path: Path, structured_output: bool
) -> None:
    """Structured by default: the reply is {"reason", "score"} JSON; a server that rejects
    response_format (400) is asked again in plain text and its "Educational score: N" parsed,
    so every document gets its score either way, and the fallback is not a failure."""
    docs = _jsonl(
        tmp_path / "docs.jsonl", [{"id": f"d{i}", "text": f"{TEXTBOOK} {i}"} for i in range(4)]
    )
    with judge_server(lambda extract: int(extract[-1]), structured_output=structured_output) as (
        url,
        calls,
    ):
        config = _config(tmp_path, url)
        result = runner.invoke(app, ["quality", "annotate", str(docs), "--config", str(config)])
        assert result.exit_code == 0, result.output
        assert calls[0] == (4 if structured_output else 8)  # each rejected request asked again
    rows = pq.read_table(tmp_path / "out/_state/quality/annotations.parquet").to_pylist()
    assert {r["id"]: r["score"] for r in rows} == {f"d{i}": i for i in range(4)}
    assert all(r["error"] is None for r in rows)
    replies = [r["response"] for r in rows]
    if structured_output:
        assert all(json.loads(r)["reason"] for r in replies)
    else:
        assert all(
            r.endswith(f"Educational score: {r_id[-1]}")
            for r, r_id in zip(replies, [r["id"] for r in rows], strict=True)
        )
    assert "http_400" not in result.output  # the fallback is not counted as a failure


def test_annotate_train_filter_end_to_end(tmp_path: Path, judge: str) -> None:
    config = _config(tmp_path, judge)
    result = runner.invoke(app, ["quality", "annotate", str(LABELLED), "--config", str(config),
                                 "--sample", "90"])  # fmt: skip
    assert result.exit_code == 0, result.output
    annotations = Path(result.stdout.strip().splitlines()[-1])
    scores = pq.read_table(annotations, columns=["score"])["score"].to_pylist()
    assert len(scores) == 90 and None not in scores

    result = runner.invoke(app, ["quality", "train", "--config", str(config)])
    assert result.exit_code == 0, result.output
    model = Path(result.stdout.strip().splitlines()[-1])
    assert model == tmp_path / "out" / "_state" / "quality" / "model.bin"
    assert "held-out" in result.output and "f1" in result.output
    card = json.loads(model.with_name("model.card.json").read_text())
    assert card["judge"] == "fake-model" and "Educational score" in card["rubric"]
    assert card["metrics"]["holdout"]["f1"] >= 0.8

    question = json.loads(MMLU.read_text().splitlines()[0])["question"]
    junk = "Buy cheap followers now! Click here, free shipping, limited offer, sign up. " * 12
    rows = [
        {"id": "edu", "text": TEXTBOOK},
        {"id": "planted", "text": TEXTBOOK + "\n\nExercise: " + question},
        {"id": "junk", "text": junk},
        {"id": "empty", "text": ""},
        {"id": 7, "text": TEXTBOOK.replace("plant", "tree"), "finish_reason": "length"},
    ]
    src = _jsonl(tmp_path / "mine.jsonl", rows)
    out = tmp_path / "filtered"
    result = runner.invoke(app, ["filter", str(src), "--out", str(out), "--benchmarks",
                                 str(MMLU), "--quality-model", str(model)])  # fmt: skip
    assert result.exit_code == 0, result.output
    con = duckdb.connect()
    kept = con.execute(f"SELECT id, lang, quality_score FROM '{out / 'kept.parquet'}'").fetchall()
    assert [(k[0], k[1]) for k in kept] == [("edu", "en")] and kept[0][2] > 0.5
    rejected = dict(con.execute(f"SELECT id, reason FROM '{out / 'rejected.parquet'}'").fetchall())
    assert rejected["planted"] == "contaminated:mmlu_mini"
    assert rejected["empty"] == "empty:no_text"
    assert rejected["7"] == "truncated:finish_length"  # ids kept verbatim (as text)
    assert rejected["junk"].split(":")[0] in ("repetition", "quality_rule", "quality")
    (detail,) = con.execute(
        f"SELECT detail FROM '{out / 'rejected.parquet'}' WHERE id = 'planted'"
    ).fetchone()
    assert json.loads(detail)["span"].startswith("Which of the following")
    counts = json.loads((out / "counts.json").read_text())
    assert counts["input"] == 5 and counts["kept"] == 1
    assert counts["by_reason"]["contaminated:mmlu_mini"] == 1


def test_filter_a_dataset_version_uses_its_trained_model(tmp_path: Path) -> None:
    from booksmith.filters.quality import train
    from booksmith.filters.records_io import read_labelled

    out_dir = tmp_path / "out"
    data, _ = read_labelled(LABELLED)
    train(data, out_dir / "_state" / "quality")
    docs = [make_doc(TEXTBOOK, "a"), make_doc("Short.", "b")]
    version = out_dir / "20260101T000000Z"
    write_version(version, InMemoryVersion(version.name, docs), ShardLayout(shard_rows=100))
    result = runner.invoke(app, ["filter", str(version), "--out", str(tmp_path / "f")])
    assert result.exit_code == 0, result.output
    kept = pq.read_table(tmp_path / "f" / "kept.parquet").to_pylist()
    assert [k["id"] for k in kept] == ["a"] and kept[0]["quality_score"] is not None
    assert kept[0]["topic"] == "photosynthesis"  # a version's provenance columns survive
    counts = json.loads((tmp_path / "f" / "counts.json").read_text())
    assert set(counts["per_filter"]) >= {"empty", "langid", "quality"}


NO_MODEL = "/nonexistent/model.bin"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--benchmarks", str(MMLU), "--benchmark-fields", "stem"], "mmlu_mini.jsonl: no column"),
        (["--quality-model", NO_MODEL], f"{NO_MODEL}: quality model file not found"),
        (["--benchmarks", "/nope/bench.csv"], "/nope/bench.csv: benchmark file not found"),
    ],
)
def test_filter_errors_are_one_line(tmp_path: Path, args: list[str], message: str) -> None:
    src = _jsonl(tmp_path / "in.jsonl", [{"id": "a", "text": TEXTBOOK}])
    result = runner.invoke(app, ["filter", str(src), "--out", str(tmp_path / "o"), *args])
    assert result.exit_code == 2
    assert message in result.output
    assert not (tmp_path / "o").exists()


def test_bad_input_files(tmp_path: Path) -> None:
    out = str(tmp_path / "o")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "text": "fine"}\n{"id": "b", "text": 3}\n')
    result = runner.invoke(app, ["filter", str(bad), "--out", out])
    assert result.exit_code == 2 and "bad.jsonl:2: `text` must be a string" in result.output
    bad.write_text('{"text": "no id"}\n')
    result = runner.invoke(app, ["filter", str(bad), "--out", out])
    assert result.exit_code == 2 and "bad.jsonl:1: no `id` field" in result.output
    binary = tmp_path / "blob.jsonl"
    binary.write_bytes(b'{"id": "a"}\n\xff\xfe\x00junk')
    result = runner.invoke(app, ["filter", str(binary), "--out", out])
    assert result.exit_code == 2 and "blob.jsonl: not UTF-8" in result.output
    result = runner.invoke(app, ["filter", str(tmp_path / "none.jsonl"), "--out", out])
    assert result.exit_code == 2 and "none.jsonl: input not found" in result.output
    result = runner.invoke(app, ["quality", "train", "--annotations", str(tmp_path / "x.parquet")])
    assert result.exit_code == 2 and "x.parquet: training data not found" in result.output


def test_retrain_schedule(tmp_path: Path) -> None:
    from datetime import UTC, datetime, timedelta

    from booksmith.filters.quality import train
    from booksmith.filters.records_io import read_labelled

    assert not retrain_due(tmp_path, None)  # unscheduled: never
    assert retrain_due(tmp_path, 7)  # scheduled and no model yet
    data, _ = read_labelled(LABELLED)
    train(data, tmp_path)
    now = datetime.now(UTC)
    assert not retrain_due(tmp_path, 7, now=now + timedelta(days=6))
    assert retrain_due(tmp_path, 7, now=now + timedelta(days=7, minutes=1))


def test_filter_streams_in_batches_with_the_same_output(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Batches of 3 documents give the files one batch gives: kept and rejected rows in input
    order, counts summed over the batches."""
    from booksmith.filters import inputs

    junk = "Buy cheap followers now! Click here, free shipping, limited offer, sign up. " * 12
    texts = [TEXTBOOK, "", junk, TEXTBOOK.replace("plant", "tree"), "   ", junk + " again"]
    rows = [{"id": f"d{i}", "text": texts[i % len(texts)] + ("" if i < 6 else f" v{i}")}
            for i in range(14)]  # fmt: skip
    rows[9]["finish_reason"] = "length"
    src = _jsonl(tmp_path / "in.jsonl", rows)

    def run(out: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, Any]]:
        result = runner.invoke(app, ["filter", str(src), "--out", str(out), "--no-langid"])
        assert result.exit_code == 0, result.output
        tables = [pq.read_table(out / f"{k}.parquet").drop_columns(["created_at"]).to_pylist()
                  for k in ("kept", "rejected")]  # fmt: skip
        return tables[0], tables[1], json.loads((out / "counts.json").read_text())

    whole = run(tmp_path / "whole")
    monkeypatch.setattr(inputs, "BATCH_ROWS", 3)
    batched = run(tmp_path / "batched")
    assert batched == whole
    kept, rejected, counts = whole
    assert kept and rejected and counts["input"] == 14 == len(kept) + len(rejected)
    order = [r["id"] for r in rows]
    assert [r["id"] for r in rejected] == [i for i in order if i in {r["id"] for r in rejected}]
    assert counts["per_filter"]["empty"]["input"] == 14


def test_filter_carries_the_inputs_own_columns_through(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A user's file keeps its own columns (as `booksmith dedup` does): each kept and rejected
    row has the values of its input record, whatever the batch size; a column first seen
    after the first batch is one line naming it."""
    from booksmith.filters import inputs

    junk = "Buy cheap followers now! Click here, free shipping, limited offer, sign up. " * 12
    rows = [
        {"id": f"d{i}", "text": [TEXTBOOK + f" v{i}", "", junk][i % 3], "source": f"s{i}",
         **({"license": "cc-by"} if i % 2 else {})}
        for i in range(9)
    ]  # fmt: skip
    src = _jsonl(tmp_path / "in.jsonl", rows)

    def run(out: Path) -> dict[str, dict[str, Any]]:
        result = runner.invoke(app, ["filter", str(src), "--out", str(out), "--no-langid"])
        assert result.exit_code == 0, result.output
        by_id = {}
        for name in ("kept", "rejected"):
            for r in pq.read_table(out / f"{name}.parquet").to_pylist():
                by_id[r["id"]] = {"file": name, "source": r["source"], "license": r["license"]}
        return by_id

    whole = run(tmp_path / "whole")
    monkeypatch.setattr(inputs, "BATCH_ROWS", 2)
    assert run(tmp_path / "batched") == whole
    assert set(whole) == {r["id"] for r in rows}
    assert {v["file"] for v in whole.values()} == {"kept", "rejected"}
    for r in rows:
        assert whole[r["id"]]["source"] == r["source"]
        assert whole[r["id"]]["license"] == r.get("license")

    late = _jsonl(tmp_path / "late.jsonl", [*rows[:4], {**rows[4], "lang_hint": "en"}])
    result = runner.invoke(app, ["filter", str(late), "--out", str(tmp_path / "l")])
    assert result.exit_code == 2
    assert "column(s) ['lang_hint'] first appear after record 4" in " ".join(result.output.split())
