"""annotate -> train -> filter on the embedded model (SmolLM2-135M-Instruct on llama.cpp).

A 135M judge's scores say little about the text (it gave every fixture document a 1 here), so
this test does not ask the classifier to learn from them; the learning is proved on the labelled
fixture (test_filters_quality.py). What it proves on the real model: every reply of the judge
is a parsable score (structured output; in plain text this model never wrote "Educational
score: N"), the stored score is the one in the reply, and the annotations file is what
`quality train` reads, judge and rubric recorded in the model's card, with the judge's labels
replacing the fixture's for the documents it judged."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import typer
import yaml
from typer.testing import CliRunner

from booksmith.filters.annotate import parse_score
from booksmith.flows import cli_quality
from tests.filters_helpers import LABELLED, TEXTBOOK

app = typer.Typer()
app.add_typer(cli_quality.quality_app, name="quality")
app.command("filter")(cli_quality.filter_command)
runner = CliRunner()


@pytest.mark.slow
@pytest.mark.e2e
def test_annotate_train_filter_on_the_embedded_model(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "generation": {"backend": "embedded"},
                "embedded": {"n_parallel": 2, "ctx_per_seq": 1024},
                "output": {"dir": str(tmp_path / "out")},
            }
        )
    )
    result = runner.invoke(app, ["quality", "annotate", str(LABELLED), "--config", str(config),
                                 "--sample", "3", "--max-tokens", "96"])  # fmt: skip
    assert result.exit_code == 0, result.output
    annotations = Path(result.stdout.strip().splitlines()[-1])
    rows = pq.read_table(annotations).to_pylist()
    assert len(rows) == 3
    assert all(r["judge"] == "SmolLM2-135M-Instruct" and r["backend"] == "embedded" for r in rows)
    for r in rows:  # the grammar made every reply a {"reason", "score"} object
        reply = json.loads(r["response"])
        assert r["error"] is None and r["score"] == reply["score"] == parse_score(r["response"])
        assert 0 <= r["score"] <= 5 and isinstance(reply["reason"], str)

    # The fixture's labels for the documents the judge did not see, so both classes exist;
    # written as an annotations file, the judge column and all (what `train` reads).
    judged = {r["id"]: r for r in rows}
    fixture = [json.loads(line) for line in LABELLED.read_text().splitlines()]
    others = [
        {**judged[next(iter(judged))], "id": f["id"], "text": f["text"], "score": f["score"]}
        for f in fixture
        if f["id"] not in judged
    ]
    mixed = tmp_path / "annotations.parquet"
    pq.write_table(pa.Table.from_pylist(rows + others, schema=pq.read_schema(annotations)), mixed)
    result = runner.invoke(app, ["quality", "train", "--config", str(config),
                                 "--annotations", str(mixed)])  # fmt: skip
    assert result.exit_code == 0, result.output
    model = Path(result.stdout.strip().splitlines()[-1])
    card = json.loads(model.with_name("model.card.json").read_text())
    assert card["judge"] == "SmolLM2-135M-Instruct" and "Educational score" in card["rubric"]
    assert card["data"]["rows"] == len(fixture)  # every row read, the judge's three included

    src = tmp_path / "docs.jsonl"
    src.write_text(json.dumps({"id": "a", "text": TEXTBOOK}) + "\n")
    result = runner.invoke(app, ["filter", str(src), "--out", str(tmp_path / "f"),
                                 "--quality-model", str(model)])  # fmt: skip
    assert result.exit_code == 0, result.output
    kept = pq.read_table(tmp_path / "f" / "kept.parquet").to_pylist()
    assert [k["id"] for k in kept] == ["a"] and kept[0]["quality_score"] is not None
