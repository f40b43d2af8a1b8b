"""Per-recipe output minimums (prompts/recipes.yaml `min_tokens`, `min_words`): a grounded
document is judged by its recipe's minimum, which is below the textbook minimum of `filters:`
for a distill or a list; a recipe without one, and a topic document, keep `filters:`'s; a
recipe's requests ask for at least its minimum; a bad value is one line naming the file."""

from __future__ import annotations

from pathlib import Path

import pytest

from booksmith.filters.base import run_chain
from booksmith.filters.chain import build_chain
from booksmith.filters.generation_artifacts import GenerationArtifactFilter
from booksmith.filters.gopher_quality import GopherQualityFilter
from booksmith.generation.grounded_requests import GroundedRequests
from booksmith.generation.passages import Passage
from booksmith.prompts import PromptError
from booksmith.prompts.recipes import load_recipes
from booksmith.schemas import Document
from booksmith.schemas.config import RunConfig
from booksmith.schemas.filter_settings import FilterSettings
from booksmith.schemas.records import Grounding
from tests.filters_helpers import make_doc
from tests.test_faithfulness import PASSAGE, faithful
from tests.test_faithfulness import grounded as grounded_prompt

RECIPES = load_recipes()
DISTILL = RECIPES["distill"]
DEFAULTS = FilterSettings()


def grounded(text: str, recipe: str) -> Document:
    """A document of `recipe` with `text`, its prompt a real request of that recipe."""
    doc = grounded_prompt(text, recipe)
    return doc.model_copy(update={"recipe": recipe, "source_name": "pydoc"})


def _words_up_to_tokens(text: str, low: int, high: int) -> str:
    """The longest prefix of `text`'s words whose token count stays under `high`; it must
    reach `low` (the test needs a length between the two)."""
    words = text.split()
    best = ""
    for n in range(1, len(words) + 1):
        candidate = " ".join(words[:n])
        if make_doc(candidate).n_tokens >= high:
            break
        best = candidate
    assert make_doc(best).n_tokens >= low, "the passage is too short for this test"
    return best


def test_the_bundled_recipes_set_minimums_below_the_textbook_one() -> None:
    own = {name: r.min_tokens for name, r in RECIPES.items() if r.min_tokens is not None}
    assert "distill" in own and "knowledge_list" in own
    assert all(m < DEFAULTS.artifacts.min_tokens for m in own.values())
    assert RECIPES["textbook_unit"].min_tokens is None  # a unit: the textbook minimum


def test_a_distill_between_its_minimum_and_the_textbook_one_is_kept() -> None:
    assert DISTILL.min_tokens is not None
    middle = (DISTILL.min_tokens + DEFAULTS.artifacts.min_tokens) // 2
    text = _words_up_to_tokens(faithful(), DISTILL.min_tokens + 5, middle)
    doc = grounded(text + ".", "distill")  # (a sentence's end: the line rules want one)
    assert DISTILL.min_tokens < doc.n_tokens < DEFAULTS.artifacts.min_tokens
    # through the whole default chain (length, Gopher, lines, faithfulness): kept
    result = run_chain([doc], build_chain(DEFAULTS))
    assert [d.id for d in result.kept] == [doc.id], [r.reason for r in result.rejected]
    # the same text judged by the textbook minimum: too short
    for other in (grounded(doc.text, "textbook_unit"), make_doc(doc.text)):
        verdict = GenerationArtifactFilter().check(other)
        assert verdict == (
            "too_short:tokens",
            {"tokens": doc.n_tokens, "min": DEFAULTS.artifacts.min_tokens},
        )
    # and a distill under its own minimum is rejected, naming whose minimum it was
    short = grounded(_words_up_to_tokens(faithful(), 5, DISTILL.min_tokens), "distill")
    verdict = GenerationArtifactFilter().check(short)
    assert verdict == (
        "too_short:tokens",
        {"tokens": short.n_tokens, "min": DISTILL.min_tokens, "recipe": "distill"},
    )


def test_gopher_words_follow_the_recipe_too() -> None:
    assert DISTILL.min_words is not None
    gopher = DEFAULTS.gopher_quality.min_words
    words = faithful().split()[: (DISTILL.min_words + gopher) // 2]  # between the two
    doc = grounded(" ".join(words) + ".", "distill")
    assert DISTILL.min_words <= len(doc.text.split()) < gopher
    assert GopherQualityFilter().check(doc) is None
    verdict = GopherQualityFilter().check(grounded(doc.text, "textbook_unit"))
    assert verdict == ("too_short:words", {"words": len(words), "min": gopher})
    tiny = grounded(" ".join(words[: DISTILL.min_words - 1]), "distill")
    verdict = GopherQualityFilter().check(tiny)
    assert verdict is not None and verdict[0] == "too_short:words"
    assert verdict[1] == {"words": DISTILL.min_words - 1, "min": DISTILL.min_words,
                          "recipe": "distill"}  # fmt: skip


def _request_max_tokens(cfg: RunConfig, recipe: str) -> int:
    maker = GroundedRequests(cfg, 1, "pydoc")
    p = Passage(index=0, start=0, end=len(PASSAGE), text=PASSAGE, n_tokens=300)
    where = Grounding(source_id="exceptions", source_name="pydoc")
    return maker._request(recipe, p, where, "exceptions").sampling.max_tokens


def test_a_request_asks_for_at_least_its_recipe_minimum() -> None:
    short = {"generation": {"sampling": {"max_tokens": 48}}}
    cfg = RunConfig.model_validate(short)
    assert _request_max_tokens(cfg, "distill") == DISTILL.min_tokens
    assert _request_max_tokens(cfg, "textbook_unit") == DEFAULTS.artifacts.min_tokens
    # a cap above every minimum is left as configured
    assert _request_max_tokens(RunConfig(), "distill") == RunConfig().generation.sampling.max_tokens
    # no length rule, nothing to make room for
    off = RunConfig.model_validate({**short, "filters": {"artifacts": {"enabled": False}}})
    assert _request_max_tokens(off, "textbook_unit") == 48


@pytest.mark.parametrize("bad", ["-5", "many"])
def test_a_bad_minimum_is_one_line_naming_the_file_and_key(tmp_path: Path, bad: str) -> None:
    path = tmp_path / "recipes.yaml"
    path.write_text(f"distill:\n  template: distill\n  min_tokens: {bad}\n", encoding="utf-8")
    with pytest.raises(PromptError) as e:
        load_recipes(path)
    message = str(e.value)
    assert str(path) in message and "min_tokens" in message and "\n" not in message.strip()
