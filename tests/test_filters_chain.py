"""The chain's order and composition follow the settings; the trained model is found in state."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from booksmith.filters.chain import build_chain
from booksmith.filters.quality import train
from booksmith.filters.records_io import read_labelled
from booksmith.schemas.filter_settings import DecontamSettings, FilterError, FilterSettings
from tests.filters_helpers import LABELLED, MMLU


def test_default_chain_without_benchmarks_or_model() -> None:
    names = [f.name for f in build_chain(FilterSettings())]
    assert names == [
        "empty",
        "generation_artifacts",
        "gopher_quality",
        "gopher_repetition",
        "lines",
        "langid",
    ]


def test_full_chain_order_and_trained_model_from_state(tmp_path: Path) -> None:
    data, _ = read_labelled(LABELLED)
    train(data, tmp_path / "_state" / "quality")
    settings = FilterSettings(decontam=DecontamSettings(benchmarks=[str(MMLU)]))
    names = [f.name for f in build_chain(settings, state=tmp_path / "_state")]
    assert names[-3:] == ["langid", "decontam", "quality"]
    settings.gopher_repetition.enabled = False
    settings.langid.enabled = False
    names = [f.name for f in build_chain(settings)]
    assert "gopher_repetition" not in names and "langid" not in names and "quality" not in names


def test_benchmarks_without_usable_items_are_an_error(tmp_path: Path) -> None:
    short = tmp_path / "short.jsonl"
    short.write_text(json.dumps({"question": "What is 2 + 2?"}) + "\n")
    settings = FilterSettings(decontam=DecontamSettings(benchmarks=[str(short)]))
    with pytest.raises(FilterError, match=r"no benchmark item of 8\+ words in .*short\.jsonl"):
        build_chain(settings)


def test_settings_reject_unknown_keys() -> None:
    with pytest.raises(ValueError, match="extra"):
        FilterSettings.model_validate({"langid": {"min_scor": 0.5}})
