"""The fastText quality classifier learns textbook prose against junk on a labelled fixture
(held-out F1 floor 0.8), is saved with a card, scores documents, and rejects bad models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from booksmith.filters.inputs import InputError
from booksmith.filters.quality import QualityFilter, QualityModel, TrainReport, in_holdout, train
from booksmith.filters.records_io import read_labelled
from booksmith.schemas.filter_settings import FilterError, QualitySettings
from tests.filters_helpers import LABELLED, TEXTBOOK, make_doc

F1_FLOOR = 0.8  # measured 0.94 on the held-out part (18 documents, 8 educational)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> TrainReport:
    data, skipped = read_labelled(LABELLED)
    assert skipped == 0 and len(data) == 90
    out = tmp_path_factory.mktemp("quality")
    return train(data, out, QualitySettings(), source=str(LABELLED), judge="hand labels")


def test_classifier_learns_the_labelled_fixture(trained: TrainReport) -> None:
    h = trained.holdout
    assert h.n >= 15 and 0 < h.positives < h.n
    assert h.f1 >= F1_FLOOR, h
    assert trained.train.f1 >= h.f1


def test_split_is_stable_and_disjoint() -> None:
    data, _ = read_labelled(LABELLED)
    held = [d.id for d in data if in_holdout(d.id, 0.2)]
    assert held == [d.id for d in data if in_holdout(d.id, 0.2)]
    assert 10 <= len(held) <= 30


def test_model_is_small_and_has_a_card(trained: TrainReport) -> None:
    path = trained.model_path
    assert path.stat().st_size < 20_000_000  # bucket=50,000, dim=32 (not fastText's 800 MB)
    card = json.loads(path.with_name("model.card.json").read_text())
    assert card["model"]["bytes"] == path.stat().st_size
    assert card["data"] == {
        "source": str(LABELLED),
        "rows": 90,
        "train": trained.train.n,
        "holdout": trained.holdout.n,
        "label_threshold": 3,
    }
    assert card["metrics"]["holdout"]["f1"] == trained.holdout.f1
    assert card["settings"]["word_ngrams"] == 2 and card["judge"] == "hand labels"
    md = path.with_name("model.card.md").read_text()
    assert "F1" in md and card["model"]["sha256"] in md


def test_filter_scores_every_document(trained: TrainReport) -> None:
    junk = (
        "Subscribe now! Buy cheap followers and likes, free shipping, click here to win a "
        "prize, limited offer, sign up free today, no credit card required. " * 3
    )
    qf = QualityFilter(QualityModel(trained.model_path), threshold=0.7)
    out = qf.run([make_doc(TEXTBOOK, "edu"), make_doc(junk, "junk")])
    assert [d.id for d in out.kept] == ["edu"]
    assert out.kept[0].quality_score is not None and out.kept[0].quality_score > 0.7
    rejected = out.rejected[0]
    assert rejected.reason == "quality:below_threshold"
    assert rejected.quality_score is not None and rejected.quality_score < 0.7
    assert out.details[0] == {"score": round(rejected.quality_score, 4), "threshold": 0.7}


def test_corrupt_missing_and_foreign_models(trained: TrainReport, tmp_path: Path) -> None:
    with pytest.raises(FilterError, match="not found"):
        QualityModel(tmp_path / "model.bin")
    copy_dir = tmp_path / "copy"
    copy_dir.mkdir()
    model = copy_dir / "model.bin"
    model.write_bytes(trained.model_path.read_bytes()[:100_000])  # truncated
    card = trained.model_path.with_name("model.card.json")
    (copy_dir / "model.card.json").write_text(card.read_text())
    with pytest.raises(FilterError, match="sha256 mismatch"):
        QualityModel(model)
    (copy_dir / "model.card.json").write_text("{")
    with pytest.raises(FilterError, match="corrupt model card"):
        QualityModel(model)
    from booksmith.filters.fasttext_model import bundled_lid176

    with pytest.raises(FilterError, match="not a booksmith quality model"):
        QualityModel(bundled_lid176())


def test_training_needs_both_classes(tmp_path: Path) -> None:
    data, _ = read_labelled(LABELLED)
    positives = [d for d in data if d.score >= 3]
    with pytest.raises(FilterError, match="only positive examples"):
        train(positives, tmp_path)


def test_labelled_file_errors(tmp_path: Path) -> None:
    bad = tmp_path / "labels.jsonl"
    bad.write_text('{"text": "a", "score": 5}\n{"text": "b"}\n')
    with pytest.raises(InputError, match=r"labels\.jsonl:2: no `score` field"):
        read_labelled(bad)
    bad.write_text('{"text": "a", "score": "high"}\n')
    with pytest.raises(FilterError, match="must be a number"):
        read_labelled(bad)
    bad.write_text('{"text": "a", "score": null}\n{"text": "b", "score": 2}\n')
    data, skipped = read_labelled(bad)
    assert skipped == 1 and [d.score for d in data] == [2.0]
