"""The nightly flow re-annotates and retrains the quality classifier on the schedule in the
config, with a separate judge endpoint; the next night filters with the new model."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from booksmith.shards.version_dir import read_manifest
from tests.conftest import fake_backend_config
from tests.fakeserver import FakeServer
from tests.judge import judge_server


def _hash_score(extract: str) -> int:
    """A score that is a pure function of the extract (so the run is reproducible); it only
    has to give both classes: this test is about the schedule, not the learning."""
    return 4 if hashlib.sha256(extract.encode()).digest()[0] % 2 else 1


@pytest.fixture
def judge() -> Iterator[tuple[str, list[int]]]:
    with judge_server(_hash_score) as served:
        yield served


def test_retrain_on_schedule_then_filter_with_the_new_model(
    prefect_api: str, judge: tuple[str, list[int]], tmp_path: Path, write_config
) -> None:
    from booksmith.flows.nightly import nightly

    judge_url, judge_calls = judge
    out = tmp_path / "out"
    with FakeServer() as generator:
        cfg = fake_backend_config(generator.base_url, out)
        cfg["plan"]["limit"] = 24
        cfg["filters"] = {
            "quality": {"retrain_every_days": 1, "threshold": 0.0},
            "annotate": {"base_url": judge_url, "model": "judge-model", "sample": 24},
        }
        first = Path(nightly(config=str(write_config(cfg))))
        model = out / "_state" / "quality" / "model.bin"
        assert model.is_file()
        card = json.loads(model.with_name("model.card.json").read_text())
        assert card["judge"] == "judge-model"
        annotations = pq.read_table(out / "_state" / "quality" / "annotations.parquet")
        assert annotations.num_rows == read_manifest(first).documents == judge_calls[0]
        # the first night had no model yet
        assert pq.read_table(first / "text", columns=["quality_score"])[0].null_count > 0

        cfg["seed"] = 8
        second = Path(nightly(config=str(write_config(cfg, "night2.yaml"))))
    scores = pq.read_table(second / "text", columns=["quality_score"])[0].to_pylist()
    assert scores and all(s is not None and 0 <= s <= 1 for s in scores)
    assert "quality" in read_manifest(second).counts.filter
    # retrained one day ago at most: not due again, so the judge was not asked again
    assert judge_calls[0] == annotations.num_rows
