"""Faithfulness rules for grounded documents (filters/faithfulness.py): the passage read back from
every recipe's real prompt, each rule on a text built to break it, documents without a source
untouched, and a grounded run on the fake server whose off-source answers are rejected with
their reason and figures, counted in the manifest."""

from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from booksmith.filters.chain import build_chain
from booksmith.filters.faithfulness import (
    _CAPITALISED,
    SENTENCE_ENDS,
    FaithfulnessFilter,
    longest_copied_run,
    names,
    passage_of,
)
from booksmith.generation.grounded_requests import GroundedRequests
from booksmith.generation.passages import Passage
from booksmith.schemas import Document
from booksmith.schemas.config import RunConfig
from booksmith.schemas.filter_settings import FaithfulnessSettings, FilterSettings
from booksmith.schemas.records import Grounding
from booksmith.shards.version_dir import read_manifest
from tests.conftest import fake_backend_config
from tests.fakeserver import FakeServer
from tests.filters_helpers import make_doc
from tests.test_grounded_plan import TOPICS, write_source

PASSAGE = TOPICS["exceptions"][:1800]
RECIPES = ("textbook_unit", "wikipedia_rephrase", "qa_rephrase", "diverse_qa", "distill",
           "extract_knowledge", "knowledge_list")  # fmt: skip


def grounded(text: str, recipe: str = "wikipedia_rephrase", passage: str = PASSAGE) -> Document:
    """A document with `text`, made from a real request of `recipe` for `passage`."""
    maker = GroundedRequests(RunConfig(), 1, "pydoc")
    p = Passage(index=0, start=0, end=len(passage), text=passage, n_tokens=300)
    where = Grounding(source_id="exceptions", source_name="pydoc", recipe=recipe)
    request = maker._request(recipe, p, where, "exceptions")
    return make_doc(text).model_copy(update={"prompt": request.prompt, "source_id": "exceptions"})


def faithful(passage: str = PASSAGE) -> str:
    """The passage with every seventh word left out: no run of 7+ words copied, nothing new."""
    words = passage.split()
    return " ".join(w for i, w in enumerate(words) if i % 7 != 6)


@pytest.mark.parametrize("recipe", RECIPES)
def test_the_passage_is_read_back_from_every_recipe_prompt(recipe: str) -> None:
    assert passage_of(grounded("x", recipe)) == PASSAGE


def test_each_rule_rejects_what_it_is_for_and_keeps_a_faithful_rephrase() -> None:
    rules = FaithfulnessFilter(FaithfulnessSettings())
    assert rules.check(grounded(faithful())) is None

    copied = rules.check(grounded(PASSAGE))
    assert copied is not None and copied[0] == "grounding:copied"
    assert copied[1]["copied_words"] >= len(PASSAGE.split()) - 1

    invented = faithful() + " In 1887 the Hargreaves committee met 42 times at Cambridge."
    verdict = rules.check(grounded(invented))
    assert verdict is not None and verdict[0] == "grounding:unsupported"
    assert {"1887", "42"} <= set(verdict[1]["numbers"])
    assert {"Hargreaves", "Cambridge"} <= set(verdict[1]["names"])

    elsewhere = (
        "Photosynthesis converts light energy into chemical energy stored in glucose. Plants "
        "absorb carbon dioxide through stomata and release oxygen. Chlorophyll pigments capture "
        "photons mostly in the blue and red parts of the spectrum. "
    ) * 3
    verdict = rules.check(grounded(elsewhere))
    assert verdict is not None and verdict[0] == "grounding:off_source"
    assert verdict[1]["overlap"] < 0.33


def test_the_copied_run_is_measured_exactly_across_case_punctuation_and_breaks() -> None:
    """The copied rule counts on decontamination's n-gram index (filters/decontam.py): a run's
    length is its matched 8-gram windows + 7, two runs apart stay two, and case and punctuation
    do not hide a copy."""
    words = re.findall(r"\w+", PASSAGE)  # words as the index counts them
    filler = "zebra quartz mallow " * 3
    long_run = ". ".join(words[40:70]).upper()  # 30 words, re-cased, re-punctuated
    short_run = " ".join(words[100:112])  # 12 words
    text = f"{filler}{long_run} {filler}{short_run} {filler}"
    assert longest_copied_run(text, PASSAGE) == 30
    assert longest_copied_run(f"{filler}{short_run} {filler}", PASSAGE) == 12
    assert longest_copied_run(" ".join(words[10:17]), PASSAGE) == 0  # under one 8-gram
    rules = FaithfulnessFilter(FaithfulnessSettings(max_copied_words=29))
    verdict = rules.check(grounded(text))
    assert verdict == ("grounding:copied", {"copied_words": 30, "max": 29})
    verdict = FaithfulnessFilter(FaithfulnessSettings(max_copied_words=30)).check(grounded(text))
    assert verdict is None or verdict[0] != "grounding:copied"


def names_by_the_old_rule(text: str) -> set[str]:
    """The rule `names` had before it scanned back in place: it copied the text before each
    capitalised word (quadratic in a document's length); kept here as the oracle."""
    found = set()
    for m in _CAPITALISED.finditer(text):
        before = text[: m.start()].rstrip(" \t")
        if before and before[-1] != "\n" and before[-1] not in SENTENCE_ENDS:
            found.add(m.group())
    return found


def test_names_finds_what_the_copying_rule_found_on_varied_and_long_texts() -> None:
    edges = [
        "", "Alice", "  \t Alice", "met Alice", "met \t  Alice", "met.\tAlice", "met.  Alice",
        "x\nAlice", "x\n \tAlice", "x\r\nAlice", "x\rAlice", "x\u00a0Alice", "x\u3000Alice",
        "(Alice)", '"Alice" and Bob', "- Alice", "# Alice", "> Alice", "a: Alice", "a* Alice",
        "über Alice", "ABC Alice", "Al Alice", "mid-Alice", "e.g. Alice met Bob in Paris.",
    ]  # fmt: skip
    for text in edges:
        assert names(text) == names_by_the_old_rule(text), repr(text)
    rng = random.Random(18)
    pieces = ["Alice", "Bob", "Paris", "Ab", "ALL", "the", "of", "x", "1887", "Éclair", " ", "  ",
              "\t", "\n", "\r", ". ", ".", "!", "?", ":", "*", "#", ">", "-", ",", ";", "(", ")",
              "\u00a0"]  # fmt: skip
    for _ in range(300):
        text = "".join(rng.choice(pieces) for _ in range(rng.randrange(1, 40)))
        assert names(text) == names_by_the_old_rule(text), repr(text)
    parts, size = [], 0
    while size < 200_000:  # a 200 KB document: random pieces and many distinct names
        name = "N" + "".join(chr(97 + int(c, 16)) for c in f"{len(parts):x}") + "ame"
        part = rng.choice(pieces) + rng.choice(pieces) + rng.choice([name, "the"]) + " "
        parts.append(part)
        size += len(part)
    long_text = "".join(parts)
    found = names(long_text)
    assert len(found) > 100  # names are found in it, not just agreed on being absent
    assert found == names_by_the_old_rule(long_text)


def test_documents_without_a_source_pass_untouched() -> None:
    rules = FaithfulnessFilter(FaithfulnessSettings())
    plain = make_doc(PASSAGE)  # a copy, but of no source
    assert passage_of(plain) is None and rules.check(plain) is None
    names = [f.name for f in build_chain(FilterSettings())]
    assert "faithfulness" in names
    off = FilterSettings.model_validate({"faithfulness": {"enabled": False}})
    assert "faithfulness" not in [f.name for f in build_chain(off)]


def test_a_config_without_sources_hashes_as_before_the_rules_existed() -> None:
    plain = RunConfig()
    changed = RunConfig.model_validate({"filters": {"faithfulness": {"min_overlap": 0.9}}})
    assert plain.config_hash() == changed.config_hash()  # no source: the rules judge nothing
    with_sources = {"sources": [{"path": "a.jsonl"}]}
    a = RunConfig.model_validate(with_sources)
    b = RunConfig.model_validate(
        {**with_sources, "filters": {"faithfulness": {"min_overlap": 0.9}}}
    )
    assert a.config_hash() != b.config_hash()


@pytest.mark.slow
def test_a_grounded_run_rejects_its_off_source_answers(
    prefect_api: str, tmp_path: Path, write_config: Any
) -> None:
    from booksmith.flows.nightly import nightly
    from booksmith.flows.task_runners import with_runner
    from booksmith.schemas.config import load_config

    source = write_source(tmp_path / "pydoc.jsonl")
    with FakeServer({"unfaithful": 0.5}) as server:
        data = fake_backend_config(server.base_url, tmp_path / "out")
        data.update(seed=3, sources=[{"path": str(source)}], plan={"limit": 16})
        config = write_config(data)
        version = Path(with_runner(nightly, load_config(config))(config=str(config)))
    counts = read_manifest(version).counts.filter["faithfulness"]
    rejected = [
        r for r in pq.read_table(version / "rejected").to_pylist()
        if r["reason"].startswith("grounding:")
    ]  # fmt: skip
    assert rejected and counts["grounding:off_source"] == len(rejected)
    assert counts["kept"] > 0  # the faithful half
    for r in rejected:
        assert r["reason"] == "grounding:off_source" and r["source_id"]
        assert '"overlap"' in r["detail"]
