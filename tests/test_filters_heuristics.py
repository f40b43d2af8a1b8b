"""Heuristic rules: each rule fires with its own reason on text made to break it, and a real
textbook chapter passes all of them."""

from __future__ import annotations

import json
import random

import pytest

from booksmith.filters import gopher_quality, gopher_repetition, lines
from booksmith.filters.base import run_chain
from booksmith.filters.chain import build_chain
from booksmith.filters.generation_artifacts import GenerationArtifactFilter
from booksmith.filters.gopher_quality import GopherQualityFilter
from booksmith.filters.gopher_repetition import GopherRepetitionFilter
from booksmith.filters.lines import LineFilter
from booksmith.schemas.filter_settings import (
    ArtifactSettings,
    FilterError,
    FilterSettings,
    GopherQualitySettings,
    GopherRepetitionSettings,
    LineSettings,
)
from tests.filters_helpers import FIXTURES, TEXTBOOK, make_doc


def _unique_words(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    return ["".join(rng.choice(letters) for _ in range(rng.randint(4, 8))) for _ in range(n)]


def _sentences(count: int, seed: int = 0) -> list[str]:
    words = _unique_words(count * 12, seed)
    return [" ".join(words[i * 12 : (i + 1) * 12]) + "." for i in range(count)]


ELLIPSES = "The young plant grows slowly toward the window light and then rests...\n" * 10
NO_STOP_WORDS = "Photosynthesis converts sunlight into chemical energy inside leaves " * 8


def test_textbook_chapter_passes_every_heuristic() -> None:
    assert gopher_quality.check(TEXTBOOK, GopherQualitySettings()) is None
    assert gopher_repetition.check(TEXTBOOK, GopherRepetitionSettings()) is None
    assert lines.check(TEXTBOOK, LineSettings()) is None
    assert GenerationArtifactFilter().check(make_doc(TEXTBOOK)) is None


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("The cell is small.", "too_short:words"),
        ("I am at an ox. " * 20, "quality_rule:mean_word_length"),
        ("Pneumonoultramicroscopicsilicovolcanoconiosis " * 60, "quality_rule:mean_word_length"),
        (TEXTBOOK + " ..." * 40, "quality_rule:symbol_word_ratio"),
        (TEXTBOOK + "\n" + "#\n" * 40, "quality_rule:symbol_word_ratio"),
        ("- The cell divides and grows into the plant tissue.\n" * 8, "quality_rule:bullet_lines"),
        (ELLIPSES, "quality_rule:ellipsis_lines"),
        ("the 1234 5678 and 9012 3456 with 7890 1234 " * 10, "quality_rule:alpha_words"),
        (NO_STOP_WORDS, "quality_rule:stop_words"),
    ],
)  # fmt: skip
def test_gopher_quality_rules(text: str, reason: str) -> None:
    broken = gopher_quality.check(text, GopherQualitySettings())
    assert broken is not None
    assert broken[0] == reason


def test_gopher_quality_thresholds_come_from_settings() -> None:
    assert gopher_quality.check(TEXTBOOK, GopherQualitySettings(max_words=100)) == (
        "quality_rule:too_many_words",
        {"words": len(TEXTBOOK.split()), "max": 100},
    )
    few = "The green cell grows with the sunlight."
    assert gopher_quality.check(few, GopherQualitySettings(min_words=3)) is None


def test_markdown_headings_count_once_per_heading() -> None:
    # "## Title" is one hash-word, not two symbols: a chapter with many headings passes.
    text = "\n\n".join(f"## Part {i}\n\n{TEXTBOOK[:400]}" for i in range(8))
    assert gopher_quality.check(text, GopherQualitySettings()) is None


def test_repetition_paragraphs_and_lines() -> None:
    s = GopherRepetitionSettings()
    p1, p2 = _sentences(2)
    assert gopher_repetition.check("\n\n".join([p1, p2, p1, p1]), s) == (
        "repetition:dup_para_frac",
        {"value": 0.5, "max": 0.3},
    )
    long_para = " ".join(_sentences(6, seed=1))
    paras = [*_sentences(10, seed=2), long_para, long_para]
    reason = gopher_repetition.check("\n\n".join(paras), s)
    assert reason is not None and reason[0] == "repetition:dup_para_char_frac"
    assert gopher_repetition.check("\n".join([p1, p2, p1, p1]), s) is not None
    assert gopher_repetition.check("\n".join([p1, p2, p1, p1]), s)[0] == "repetition:dup_line_frac"  # type: ignore[index]
    reason = gopher_repetition.check("\n".join(paras), s)
    assert reason is not None and reason[0] == "repetition:dup_line_char_frac"


def test_repetition_top_ngram() -> None:
    words = _unique_words(60, seed=3)
    text = " ".join(f"the cell {w}" for w in words)
    broken = gopher_repetition.check(text, GopherRepetitionSettings())
    assert broken is not None and broken[0] == "repetition:top_2_gram"
    assert broken[1]["value"] > 0.2


def test_repetition_duplicated_ngrams() -> None:
    sentences = _sentences(10, seed=4)
    text = " ".join(sentences[:5] + sentences[:3] + sentences[5:])  # one line, 3 repeats
    broken = gopher_repetition.check(text, GopherRepetitionSettings())
    assert broken is not None and broken[0] == "repetition:dup_5_gram"
    assert broken[1]["value"] == pytest.approx(3 / 13, abs=0.03)
    # Only the 10-gram rule left, and a lenient threshold: it passes.
    lenient = GopherRepetitionSettings(top_ngram_max_frac={}, dup_ngram_max_frac={10: 0.5})
    assert gopher_repetition.check(text, lenient) is None


def test_looping_model_output_is_caught_by_repetition() -> None:
    # What a small model does when it loops: the same sentences again and again.
    loop = (
        "Photosynthesis is the process by which plants make their own food using sunlight. "
        "Plants use sunlight, water and carbon dioxide to make glucose and oxygen. "
    )
    text = "Photosynthesis is important for life on Earth. " + loop * 6
    out = GopherRepetitionFilter().run([make_doc(text)])
    assert out.kept == []
    assert out.rejected[0].reason.startswith("repetition:")


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("Lorem ipsum dolor sit amet. " + TEXTBOOK, "quality_rule:lorem_ipsum"),
        ("Section heading number one\n" * 20, "quality_rule:line_punct"),
        ("Short line here.\n" * 20, "quality_rule:short_lines"),
        ("Photosynthesis-related-considerations.\n" * 20, "quality_rule:newline_ratio"),
    ],
)
def test_line_rules(text: str, reason: str) -> None:
    broken = lines.check(text, LineSettings())
    assert broken is not None and broken[0] == reason


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("As an AI language model, I cannot write a chapter. " + TEXTBOOK, "refusal:as_an_ai"),
        ("I'm sorry, but I can't write that.\n\n" + TEXTBOOK, "refusal:apology"),
        ("Unfortunately I cannot help with this request. " + TEXTBOOK, "refusal:cannot_help"),
        ("Sure! Here's a chapter about plants.\n\n" + TEXTBOOK, "quality_rule:assistant_preamble"),
        (TEXTBOOK + "\n\nI hope this helps! Let me know.", "quality_rule:assistant_sign_off"),
        (TEXTBOOK + "<|im_end|>\n<|im_start|>user", "quality_rule:chat_template_token"),
        ("[INST] Write a chapter [/INST] " + TEXTBOOK, "quality_rule:chat_template_token"),
    ],
)
def test_generation_artifacts(text: str, reason: str) -> None:
    out = GenerationArtifactFilter().run([make_doc(text)])
    assert [r.reason for r in out.rejected] == [reason]
    detail = out.details[0]
    assert detail is not None and ("match" in detail or "token" in detail)


def test_apology_inside_a_story_is_not_a_refusal() -> None:
    story = (
        TEXTBOOK + '\n\n"I\'m sorry, but the plant died," said Tom. The class looked at the leaves.'
    )
    assert GenerationArtifactFilter().check(make_doc(story)) is None


def test_truncated_and_too_few_tokens() -> None:
    f = GenerationArtifactFilter()
    out = f.run([make_doc(TEXTBOOK, "cut", finish_reason="length"), make_doc(TEXTBOOK[:300], "s")])
    assert [(r.id, r.reason) for r in out.rejected] == [
        ("cut", "truncated:finish_length"),
        ("s", "too_short:tokens"),
    ]
    assert out.details[1] is not None and out.details[1]["min"] == 150
    keep_cut = GenerationArtifactFilter(ArtifactSettings(drop_truncated=False))
    assert keep_cut.check(make_doc(TEXTBOOK, finish_reason="length")) is None


def test_bad_pattern_names_its_key() -> None:
    with pytest.raises(FilterError, match=r"filters\.artifacts\.refusal_patterns\.mine"):
        GenerationArtifactFilter(ArtifactSettings(refusal_patterns={"mine": "(unclosed"}))


def test_nothing_is_lost_and_every_reason_has_a_family() -> None:
    docs = [
        make_doc(TEXTBOOK, "good"),
        make_doc("", "empty"),
        make_doc("   \n ", "blank"),
        make_doc(bytes(range(256)).decode("latin-1") * 40, "binary"),
        make_doc("I am at an ox. " * 40, "short-words"),
        make_doc(TEXTBOOK, "cut", finish_reason="length"),
    ]
    settings = FilterSettings()
    settings.langid.enabled = False
    result = run_chain(docs, build_chain(settings))
    assert [d.id for d in result.kept] == ["good"]
    assert len(result.kept) + len(result.rejected) == len(docs)
    families = {"empty", "too_short", "quality_rule", "repetition", "truncated", "refusal"}
    assert all(r.reason.split(":")[0] in families for r in result.rejected)
    assert {r.id: r.reason for r in result.rejected}["empty"] == "empty:no_text"


def test_five_megabyte_document_is_rejected_quickly_by_word_count() -> None:
    text = ("The plant cell stores starch in its plastids. " * 120_000)[:5_000_000]
    settings = FilterSettings()
    settings.langid.enabled = False
    doc = make_doc("placeholder")
    doc = doc.model_copy(update={"text": text, "n_tokens": 1_000_000})
    result = run_chain([doc], build_chain(settings))
    assert [r.reason for r in result.rejected] == ["quality_rule:too_many_words"]
    detail = result.rejected[0].detail
    assert detail is not None and '"max": 100000' in detail


def test_filters_report_details_parallel_to_rejections() -> None:
    docs = [make_doc("The cell is small.", "a"), make_doc(TEXTBOOK, "b")]
    out = GopherQualityFilter().run(docs)
    assert len(out.details) == len(out.rejected) == 1
    assert out.details[0] == {"words": 4, "min": 50}
    assert LineFilter().run(docs).rejected[0].reason == "quality_rule:short_lines"  # "a"


def test_recorded_embedded_model_output() -> None:
    """Eight completions recorded from SmolLM2-135M-Instruct (400 tokens each): the four that
    loop are caught by the repetition rules, and the "Here's a textbook section" opener by the
    boilerplate rule; all eight hit the token limit."""
    rows = [json.loads(line) for line in (FIXTURES / "smollm_outputs.jsonl").open()]
    docs = [make_doc(r["text"], r["topic"], finish_reason=r["finish_reason"]) for r in rows]
    out = GopherRepetitionFilter().run(docs)
    looping = {"the water cycle", "fractions", "plate tectonics", "prime numbers"}
    assert {r.id for r in out.rejected} == looping
    assert all(r.reason.startswith("repetition:") for r in out.rejected)
    artifacts = GenerationArtifactFilter(ArtifactSettings(drop_truncated=False))
    flagged = {r.id: r.reason for r in artifacts.run(docs).rejected}
    assert flagged == {"the human heart": "quality_rule:assistant_here_is"}
    assert all(
        r.reason == "truncated:finish_length" for r in GenerationArtifactFilter().run(docs).rejected
    )
