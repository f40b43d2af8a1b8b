"""Topic expansion's quality rules (issue 17 point 4): section labels, generic section words and
the parent's name dressed up are not subtopics; no title sits under two parents; more
candidates than `breadth` are asked, ranked and the best kept; `seed` makes a run
reproducible; the report counts children per root."""

from __future__ import annotations

import json
from collections.abc import Sequence

import pytest

from booksmith.generation.topics import (
    TopicExpander,
    TopicNode,
    affix_reason,
    junk_reason,
    split_lists,
    subtopics_format,
)
from booksmith.schemas import GenerationRequest, GenerationResult


@pytest.mark.parametrize(
    "title", ["Chapter 3: Cells", "Section 2.1", "1. Alkanes", "2 Alkenes", "Part IV", "II. Acids"]
)
def test_numbered_section_labels_are_dropped(title: str) -> None:
    assert junk_reason(title) in ("numbered", "generic")
    assert junk_reason(title) == "numbered" or title in ("Section 2.1", "Part IV")


@pytest.mark.parametrize(
    "title",
    [
        "Subtopics_of_Photosynthesis",
        "concepts_list}",
        "subtopic1",
        "and that includes",
        "that have not yet been added to the list. However",
        "Premise 1",
        "} 1. Classification",
    ],
)
def test_what_a_small_model_writes_without_a_title_is_junk(title: str) -> None:
    assert junk_reason(title) == "junk"


@pytest.mark.parametrize(
    "title", ["Introduction", "History", "Applications", "Overview", "Key concepts", "Basics"]
)
def test_bare_section_words_are_generic(title: str) -> None:
    assert junk_reason(title) == "generic"


@pytest.mark.parametrize("title", ["Stereochemistry", "History of jazz", "Vector spaces"])
def test_real_topics_pass(title: str) -> None:
    assert junk_reason(title) is None
    assert affix_reason(title, ["Linear algebra", "Mathematics"]) is None


def test_the_parents_name_dressed_up_is_not_a_subtopic() -> None:
    ancestors = ["Plate tectonics", "Geology"]
    assert affix_reason("Plate tectonics theory", ancestors) == "parent_name"
    assert affix_reason("Plate Tectonics: the mantle", ancestors) == "parent_name"
    assert affix_reason("Geology 2", ancestors) == "parent_name"  # any ancestor
    assert affix_reason("History of plate tectonics", ancestors) == "generic"
    assert affix_reason("Introduction to Plate Tectonics", ancestors) == "generic"
    assert affix_reason("Mantle convection", ancestors) is None
    assert affix_reason("Plate boundaries", ancestors) is None  # shares a word, not the name


def test_lists_in_one_title_are_split() -> None:
    cut = "Earth's mantle, Earth's crust, Earth's core, Earth's geology, Ea"
    assert len(cut) >= 64
    assert split_lists(['} 1. Regression 2. "Decision trees"']) == ["Regression", "Decision trees"]
    assert split_lists(["Mantle, Crust", cut, "Faults"]) == [
        "Mantle",
        "Crust",
        "Earth's mantle",
        "Earth's crust",
        "Earth's core",
        "Earth's geology",
        "Faults",
    ]


class ByTopic:
    """Answers each expansion with the titles scripted for its topic (one list per sample
    index) and each relevance question with yes unless the child is in `no`."""

    def __init__(self, answers: dict[str, list[list[str]]], no: Sequence[str] = ()) -> None:
        self.answers, self.no = answers, set(no)
        self.requests: list[GenerationRequest] = []

    async def __call__(self, requests: Sequence[GenerationRequest]) -> dict[str, GenerationResult]:
        self.requests.extend(requests)
        out = {}
        for req in requests:
            prompt = req.messages[0].content
            if prompt.startswith("Is "):
                child = prompt.split('"')[1]
                text = json.dumps({"answer": "no" if child in self.no else "yes"})
            else:
                samples = self.answers.get(req.topic, [[]])
                titles = samples[min(req.sample_index, len(samples) - 1)]
                text = json.dumps({"subtopics": titles})
            out[req.id] = GenerationResult(request_id=req.id, text=text, finish_reason="stop")
        return out


async def test_candidates_are_ranked_and_no_title_sits_under_two_parents() -> None:
    complete = ByTopic(
        {
            "Linear algebra": [
                ["Matrices", "Football", "Linear algebra basics", "Determinants", "Vectors"],
                ["Vectors", "Football", "Chapter 2: Matrices", "Determinants", "Eigenvalues"],
                # a third answer, not asked: samples=2
                ["Overview"],
            ],
            "Calculus": [["Limits", "Vectors", "Derivatives", "Integrals", "Series"]],
        },
        no=["Football"],
    )
    fmt = subtopics_format(2)
    expander = TopicExpander(
        complete=complete, model="m", breadth=2, depth=1, samples=2, response_format=fmt
    )
    nodes = await expander.expand(["Linear algebra", "Calculus"])
    children = {
        r: [n.topic for n in nodes if n.path == [r]] for r in ("Linear algebra", "Calculus")
    }
    # proposed by both answers first: Football, Determinants and Vectors (2 votes each), in
    # the order of their first answer; Football is off topic, so the next is asked about, but
    # Calculus took Vectors in the first round (its second best): Matrices (1 vote, first in
    # its answer) comes next. Eigenvalues (1 vote, later) loses.
    assert children["Linear algebra"] == ["Determinants", "Matrices"]
    assert children["Calculus"] == ["Limits", "Vectors"]
    r = expander.report
    assert r.dropped["parent_name"] == 1 and r.dropped["numbered"] == 1
    assert r.dropped["off_topic"] == 1 and r.relevance == {"llm_yes": 4, "llm_no": 1}
    assert r.dropped["duplicate_existing"] == 1  # Vectors again, under Linear algebra
    assert r.dropped["over_breadth"] == 4  # Eigenvalues; Derivatives, Integrals, Series
    assert r.dropped["duplicate_sibling"] == 3 + 5  # second answers: votes (Calculus: all 5)
    assert r.proposed == r.kept + sum(r.dropped.values())
    assert r.per_root == {
        "Linear algebra": {"children": 2, "children_with_2": 0},
        "Calculus": {"children": 2, "children_with_2": 0},
    }
    # 2 answers per topic, each asked for 2 x breadth titles
    asks = [q for q in complete.requests if not q.messages[0].content.startswith("Is ")]
    assert len(asks) == 4 and {q.sample_index for q in asks} == {0, 1}
    schema = json.loads(asks[0].response_format or "{}")["json_schema"]["schema"]
    assert schema["properties"]["subtopics"]["maxItems"] == 4


async def test_children_repeating_the_parent_or_known_topics_are_dropped() -> None:
    complete = ByTopic({"Optics": [["Optics", "Lenses", "Acids", "Prisms"]]})
    expander = TopicExpander(complete=complete, model="m", breadth=3, depth=1)
    nodes = await expander.expand(["Optics"], existing=["Acids"])
    assert [n.topic for n in nodes[1:]] == ["Lenses", "Prisms"]
    assert expander.report.dropped == {"repeats_parent": 1, "duplicate_existing": 1}


async def test_depth_two_counts_children_with_two_of_their_own() -> None:
    complete = ByTopic(
        {
            "Optics": [["Lenses", "Prisms", "Mirrors"]],
            "Lenses": [["Focal length", "Aberration"]],
            "Prisms": [["Dispersion"]],
            "Mirrors": [["Concave mirrors", "Convex mirrors", "Periscopes"]],
        }
    )
    expander = TopicExpander(complete=complete, model="m", breadth=3, depth=2)
    await expander.expand(["Optics"])
    assert expander.report.per_root == {"Optics": {"children": 3, "children_with_2": 2}}


def test_the_seed_goes_into_every_requests_sampling_seed() -> None:
    async def never(requests: Sequence[GenerationRequest]) -> dict[str, GenerationResult]:
        raise AssertionError

    node = TopicNode("Optics", [], 0)

    def ask(seed: int | None, sample: int = 0) -> GenerationRequest:
        expander = TopicExpander(complete=never, model="m", breadth=3, seed=seed)
        return expander._expansion_ask(node, [], sample)(True)

    assert ask(1).sampling.seed == ask(1).sampling.seed and ask(1).id == ask(1).id
    assert ask(1).sampling.seed != ask(2).sampling.seed and ask(1).id != ask(2).id
    assert ask(1).sampling.seed != ask(1, 1).sampling.seed  # each sample its own
    assert ask(None).sampling.seed is not None  # unseeded: derived from the request


async def test_a_topic_left_with_fewer_than_two_children_is_asked_again() -> None:
    # Optics' first answer gives one usable title; its second round (sample 1) gives more
    complete = ByTopic(
        {"Optics": [["Lenses", "Optics", "Introduction"], ["Prisms", "Lenses", "Mirrors"]]}
    )
    expander = TopicExpander(complete=complete, model="m", breadth=3, depth=1, retries=1)
    nodes = await expander.expand(["Optics"])
    assert [n.topic for n in nodes[1:]] == ["Lenses", "Prisms", "Mirrors"]
    asks = [q for q in complete.requests if not q.messages[0].content.startswith("Is ")]
    assert [q.sample_index for q in asks] == [0, 1]
    assert expander.report.dropped["duplicate_existing"] == 1  # Lenses, kept in round one
    # without the second round it stays at one
    once = TopicExpander(complete=ByTopic(complete.answers), model="m", breadth=3, depth=1)
    assert len(await once.expand(["Optics"])) == 2
