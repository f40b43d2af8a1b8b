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
        "langid",
        "generation_artifacts",
        "gopher_quality",
        "gopher_repetition",
        "lines",
        "faithfulness",
    ]


def test_full_chain_order_and_trained_model_from_state(tmp_path: Path) -> None:
    data, _ = read_labelled(LABELLED)
    train(data, tmp_path / "_state" / "quality")
    settings = FilterSettings(decontam=DecontamSettings(benchmarks=[str(MMLU)]))
    names = [f.name for f in build_chain(settings, state=tmp_path / "_state")]
    assert names[1] == "langid" and names[-2:] == ["decontam", "quality"]
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


FRENCH = (
    "La photosynthèse est le processus par lequel les plantes vertes transforment la lumière "
    "du soleil en énergie chimique. Les feuilles captent le dioxyde de carbone de l'air et "
    "l'eau puisée par les racines. Grâce à la chlorophylle, elles produisent du glucose et "
    "rejettent de l'oxygène. Ce sucre sert ensuite à construire les tissus de la plante et à "
    "lui fournir l'énergie dont elle a besoin pour croître. Sans ce mécanisme, la vie sur "
    "Terre telle que nous la connaissons serait impossible, car presque toutes les chaînes "
    "alimentaires commencent par des organismes qui réalisent la photosynthèse. "
) * 3


def test_a_foreign_text_is_counted_as_its_language_not_as_bad_english() -> None:
    """Language id runs before the English rules (stop words would reject French first)."""
    from booksmith.filters.base import run_chain
    from booksmith.filters.inputs import user_document

    result = run_chain([user_document({"id": "fr", "text": FRENCH})], build_chain())
    (rejected,) = result.rejected
    assert rejected.reason.startswith("lang"), rejected.reason
    assert result.counts["langid"]["kept"] == 0
    # the same text later in the chain would have been a stop-words reject
    english_rules = [f for f in build_chain() if f.name == "gopher_quality"]
    (late,) = run_chain([user_document({"id": "fr", "text": FRENCH})], english_rules).rejected
    assert late.reason == "quality_rule:stop_words"
