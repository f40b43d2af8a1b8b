"""annotate -> train -> filter on the embedded model (SmolLM2-135M-Instruct on llama.cpp).

A 135M judge gives near-random scores, so this proves the wiring only; the learning is proved
on the labelled fixture (test_filters_quality.py). The judge's scored rows are trained on
together with the fixture's labels, so the training split always has both classes."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import typer
import yaml
from typer.testing import CliRunner

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
                                 "--sample", "3", "--max-tokens", "24"])  # fmt: skip
    assert result.exit_code == 0, result.output
    annotations = Path(result.stdout.strip().splitlines()[-1])
    rows = pq.read_table(annotations).to_pylist()
    assert len(rows) == 3
    assert all(r["judge"] == "SmolLM2-135M-Instruct" and r["backend"] == "embedded" for r in rows)
    assert all(r["response"] or r["error"] for r in rows)

    judged = [{"id": r["id"], "text": r["text"], "score": r["score"]} for r in rows]
    mixed = tmp_path / "mixed.jsonl"
    fixture = [json.loads(line) for line in LABELLED.read_text().splitlines()]
    ids = {r["id"] for r in judged}
    rows_out = judged + [r for r in fixture if r["id"] not in ids]
    mixed.write_text("".join(json.dumps(r) + "\n" for r in rows_out))
    result = runner.invoke(app, ["quality", "train", "--config", str(config),
                                 "--annotations", str(mixed)])  # fmt: skip
    assert result.exit_code == 0, result.output
    model = Path(result.stdout.strip().splitlines()[-1])

    src = tmp_path / "docs.jsonl"
    src.write_text(json.dumps({"id": "a", "text": TEXTBOOK}) + "\n")
    result = runner.invoke(app, ["filter", str(src), "--out", str(tmp_path / "f"),
                                 "--quality-model", str(model)])  # fmt: skip
    assert result.exit_code == 0, result.output
    kept = pq.read_table(tmp_path / "f" / "kept.parquet").to_pylist()
    assert [k["id"] for k in kept] == ["a"] and kept[0]["quality_score"] is not None
