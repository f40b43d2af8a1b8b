"""`booksmith run --sources` on the real embedded model (SmolLM2-135M on llama.cpp), through the
real CLI and a real Prefect server: every document, kept or rejected, carries its source id,
passage, recipe and licence, and the card lists the source. Short answers keep it quick."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import yaml

from booksmith.schemas.records import GROUNDING_COLUMNS
from booksmith.shards.version_dir import list_versions, read_manifest
from tests.test_grounded_plan import TOPICS, write_source

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_a_grounded_run_on_the_embedded_model(
    prefect_api: str, tmp_path: Path, write_config: Any
) -> None:
    source = write_source(tmp_path / "pydoc.jsonl")
    out = tmp_path / "out"
    config = write_config(
        {
            "seed": 5,
            "plan": {"limit": 4},
            "generation": {"sampling": {"max_tokens": 48}},
            "grounding": {"max_tokens": 200},
            "fill": {"documents": None},
            "publish": {"min_documents": 0},  # 48-token answers may all be cut and rejected
        }
    )
    result = subprocess.run(
        [sys.executable, "-m", "booksmith", "run", "--config", str(config), "--out", str(out),
         "--sources", str(source)],
        env={**os.environ, "PREFECT_API_URL": prefect_api},
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    (version,) = list_versions(out)
    manifest = read_manifest(version)
    assert manifest.counts.generate.planned == 4 and manifest.counts.generate.failed == 0
    rows = pq.read_table(version / "text").to_pylist()
    rows += pq.read_table(version / "rejected").to_pylist()
    assert len(rows) == 4
    for row in rows:
        assert row["backend"] == "embedded" and len(row["text"].split()) >= 5
        assert all(row[c] is not None for c in GROUNDING_COLUMNS)
        assert row["license"] == "PSF-2.0" and row["source_name"] == "pydoc.jsonl"
        passage = TOPICS[row["source_id"]][row["source_start"] : row["source_end"]]
        assert passage in row["prompt"]
    card = (version / "README.md").read_text(encoding="utf-8")
    meta = yaml.safe_load(card.split("---\n")[1])
    assert [s["name"] for s in meta["sources"]] == ["pydoc.jsonl"]
