"""Language id with the bundled lid.176 model: scores on every document, reasons, bad models."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from booksmith.filters.fasttext_model import bundled_lid176
from booksmith.filters.langid import LangIdFilter
from booksmith.schemas.filter_settings import FilterError, LangIdSettings
from tests.filters_helpers import TEXTBOOK, make_doc

FRENCH = (
    "La photosynthèse est le processus par lequel les plantes vertes fabriquent leur propre "
    "nourriture. Elles utilisent la lumière du soleil, l'eau et le dioxyde de carbone."
)


@pytest.fixture(scope="module")
def langid() -> LangIdFilter:
    return LangIdFilter()


def test_english_is_kept_with_its_score(langid: LangIdFilter) -> None:
    out = langid.run([make_doc(TEXTBOOK)])
    assert len(out.kept) == 1
    doc = out.kept[0]
    assert doc.lang == "en"
    assert doc.lang_score is not None and doc.lang_score > 0.9


def test_other_languages_are_rejected_with_their_code_and_score(langid: LangIdFilter) -> None:
    out = langid.run([make_doc(FRENCH, "fr"), make_doc(TEXTBOOK, "en")])
    assert [d.id for d in out.kept] == ["en"]
    rejected = out.rejected[0]
    assert rejected.reason == "lang:fr"
    assert rejected.lang == "fr" and rejected.lang_score is not None and rejected.lang_score > 0.5
    assert out.details[0] == {"lang": "fr", "score": round(rejected.lang_score, 4)}


def test_configured_languages_and_low_scores() -> None:
    both = LangIdFilter(LangIdSettings(languages=["en", "fr"]))
    assert len(both.run([make_doc(FRENCH), make_doc(TEXTBOOK)]).kept) == 2
    strict = LangIdFilter(LangIdSettings(min_score=0.999))
    mixed = "The cell divides. La cellule se divise. Die Zelle teilt sich. The end."
    out = strict.run([make_doc(mixed)])
    assert out.rejected[0].reason in ("lang:low_score", "lang:fr", "lang:de")
    en_low = strict.run([make_doc("the cell grows")])
    assert en_low.rejected[0].reason == "lang:low_score"
    assert en_low.details[0] is not None and en_low.details[0]["min"] == 0.999


def test_binary_junk_and_nul_bytes_get_a_defined_outcome(langid: LangIdFilter) -> None:
    junk = bytes(range(256)).decode("latin-1") * 50
    out = langid.run([make_doc(junk, "junk"), make_doc("\x00\x00" + TEXTBOOK, "nul")])
    assert len(out.kept) + len(out.rejected) == 2
    assert {d.id for d in out.kept} == {"nul"}
    assert all(d.lang is not None for d in [*out.kept, *out.rejected])


def test_missing_model_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FilterError, match="not found"):
        LangIdFilter(LangIdSettings(model_path=tmp_path / "lid.176.ftz"))


@pytest.mark.slow  # fastText spends about 13 s reading past the end of a truncated file
def test_corrupt_models_are_errors_not_crashes(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.ftz"
    garbage.write_bytes(b"not a model" * 100)
    with pytest.raises(FilterError, match=r"garbage\.ftz: not a usable fastText"):
        LangIdFilter(LangIdSettings(model_path=garbage))
    # A truncated lid.176 loads in fastText and then segfaults at predict(): caught first.
    truncated = tmp_path / "truncated.ftz"
    truncated.write_bytes(bundled_lid176().read_bytes()[:400_000])
    with pytest.raises(FilterError, match=r"truncated\.ftz: not a usable fastText"):
        LangIdFilter(LangIdSettings(model_path=truncated))


def test_a_copy_of_the_model_elsewhere_works(tmp_path: Path) -> None:
    copy = tmp_path / "lid.ftz"
    shutil.copy(bundled_lid176(), copy)
    assert LangIdFilter(LangIdSettings(model_path=copy)).run([make_doc(TEXTBOOK)]).kept
