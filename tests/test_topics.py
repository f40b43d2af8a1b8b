"""Topic expansion: tolerant parsing, dropping junk and repeats, relevance, the tree."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from booksmith.generation.seeds import load_seeds
from booksmith.generation.topics import (
    RELEVANCE_FORMAT,
    SCHEMA_TITLE_CHARS,
    TopicExpander,
    junk_reason,
    parse_subtopics,
    parse_yes_no,
    similar,
    subtopics_format,
    write_topic_file,
)
from booksmith.schemas import GenerationRequest, GenerationResult


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ('["Alkanes", "Alkenes"]', ["Alkanes", "Alkenes"]),
        ('Here you go: ["Alkanes", "Alkenes"] hope it helps', ["Alkanes", "Alkenes"]),
        ('[{"title": "Alkanes"}, {"topic": "Alkenes"}]', ["Alkanes", "Alkenes"]),
        ('{"subtopics": ["Alkanes", "Alkenes"]}', ["Alkanes", "Alkenes"]),
        ("1. Alkanes\n2) Alkenes\n", ["Alkanes", "Alkenes"]),
        (
            "Sure! Here are some subtopics:\n- **Alkanes**: saturated chains\n"
            "* Alkenes - double bonds",
            ["Alkanes", "Alkenes"],
        ),
        ("Subtopics:\n• Alkanes\n• Alkenes.", ["Alkanes", "Alkenes"]),
        ("", None),
    ],
)
def test_parse_subtopics_is_tolerant(answer: str, expected: list[str] | None) -> None:
    assert parse_subtopics(answer) == expected


def test_junk_and_similarity_rules() -> None:
    assert junk_reason("") == "empty"
    assert junk_reason("word " * 20) == "too_long"
    assert junk_reason("see https://example.com") == "junk"
    assert junk_reason("{{ config }}") == "junk"
    assert junk_reason("1234") == "junk"
    assert junk_reason("Sure, here are the topics") == "junk"
    assert junk_reason("Stereochemistry") is None
    assert junk_reason("Introduction") == "generic" and junk_reason("Chapter 3") == "generic"
    assert similar("The Krebs cycle", "Krebs cycle")
    assert similar("Acids and bases", "acid and base")
    assert not similar("Alkanes", "Alkenes")
    assert parse_yes_no("Yes.") is True and parse_yes_no("no, it is not") is False
    assert parse_yes_no("Maybe") is None


class Scripted:
    """A fault-injecting stand-in for the generation client: answers by prompt."""

    def __init__(self, answers: dict[str, str | None], relevance: dict[str, str | None]) -> None:
        self.answers, self.relevance = answers, relevance
        self.calls = 0

    async def __call__(self, requests: Sequence[GenerationRequest]) -> dict[str, GenerationResult]:
        self.calls += 1
        out = {}
        for req in requests:
            prompt = req.messages[0].content
            table = self.relevance if prompt.startswith("Is ") else self.answers
            key = prompt.split('"')[1]
            text = table.get(key, "")
            if text is None:  # a failed request
                out[req.id] = GenerationResult(request_id=req.id, error="http_400")
            else:
                out[req.id] = GenerationResult(request_id=req.id, text=text, finish_reason="stop")
        return out


async def test_expansion_builds_a_clean_tree_and_counts_every_drop() -> None:
    complete = Scripted(
        answers={
            "Organic chemistry": json.dumps(
                [
                    "Alkanes",
                    "alkanes",  # repeats a sibling
                    "Organic Chemistry",  # repeats the parent
                    "",
                    "Click here: https://spam.example",
                    "Stereochemistry",
                    "Reaction mechanisms",
                    "Football",  # off-topic: the LLM says no
                    "Polymers",  # the LLM gives no usable answer: lexical fallback keeps it
                    "Summary",  # a section name, not a topic
                    " ".join(["very"] * 30),
                ]
            ),
            "Alkanes": "1. Combustion of alkanes\n2. Naming alkanes\n3. Stereochemistry",
            "Stereochemistry": "I cannot help with that, it is a complicated field of study.",
            "Reaction mechanisms": None,  # the request failed
        },
        relevance={
            "Football": "No.",
            "Polymers": "hmm",
            "Naming alkanes": "yes",
            "Combustion of alkanes": "Yes",
        },
    )
    expander = TopicExpander(complete=complete, model="m", breadth=8, depth=2)
    nodes = await expander.expand(["Organic chemistry"])
    tree = {(tuple(n.path), n.topic) for n in nodes}
    assert ((), "Organic chemistry") in tree
    level1 = {n.topic for n in nodes if n.depth == 1}
    assert level1 == {"Alkanes", "Stereochemistry", "Reaction mechanisms", "Polymers"}
    level2 = {n.topic for n in nodes if n.depth == 2}
    assert level2 == {"Combustion of alkanes", "Naming alkanes"}
    assert all(n.path == ["Organic chemistry", "Alkanes"] for n in nodes if n.depth == 2)
    r = expander.report
    assert r.dropped["duplicate_sibling"] == 1 and r.dropped["repeats_parent"] == 1
    assert r.dropped["empty"] == 1 and r.dropped["junk"] == 1 and r.dropped["too_long"] == 1
    assert r.dropped["off_topic"] == 1  # Football: the LLM said no
    assert r.dropped["generic"] == 1
    assert r.dropped["duplicate_existing"] == 1  # Stereochemistry again under Alkanes
    assert r.relevance["llm_no"] == 1 and r.relevance["lexical"] >= 1
    assert r.answers_failed == 1
    assert r.answers_unparsed == 2  # the refusal is not a list, nor is an empty answer
    assert r.proposed == r.kept + sum(r.dropped.values())


async def test_breadth_caps_children_and_huge_answers_do_not_crash() -> None:
    many = json.dumps([f"Topic number {i} about cells" for i in range(500)])
    complete = Scripted(answers={"Cells": many}, relevance={})
    expander = TopicExpander(complete=complete, model="m", breadth=4, depth=1)
    nodes = await expander.expand(["Cells"])
    assert len([n for n in nodes if n.depth == 1]) == 4


def test_topic_file_round_trips_through_the_seed_loader(tmp_path: Path) -> None:
    from booksmith.generation.topics import TopicNode

    nodes = [
        TopicNode("Chemistry", [], 0),
        TopicNode("Acids", ["Chemistry"], 1),
        TopicNode("Strong acids", ["Chemistry", "Acids"], 2),
        TopicNode("Bases", ["Chemistry"], 1),
    ]
    out = tmp_path / "topics.jsonl"
    assert write_topic_file(nodes, out) == 4
    seeds = load_seeds(out)
    assert [s.topic_path for s in seeds][2] == ["Chemistry", "Acids", "Strong acids"]
    assert {s.subject for s in seeds} == {"Chemistry"}
    assert write_topic_file(nodes, out, leaves_only=True) == 2
    assert {s.topic for s in load_seeds(out)} == {"Strong acids", "Bases"}


@pytest.mark.slow
def test_expand_flow_on_the_fault_injecting_server(
    prefect_api: str, tmp_path: Path, write_config
) -> None:
    from booksmith.flows.expand import expand_topics
    from tests.conftest import fake_backend_config
    from tests.fakeserver import FakeServer

    faults = {"rate_limit": 0.2, "retry_after_s": 0.05, "server_error": 0.2, "bad_request": 0.4}
    with FakeServer(faults) as server:
        config = write_config(fake_backend_config(server.base_url, tmp_path / "out"))
        out = tmp_path / "topics.jsonl"
        args = {"topics": ["Optics", "Genetics", "Poetry"], "output": str(out), "depth": 2}
        counts = expand_topics(**args, breadth=3, config=str(config))
        stats = server.stats()
        requests = stats["requests"]
        again = expand_topics(**args, breadth=3, config=str(config))
        assert server.stats()["requests"] == requests, "a rerun asked again"
    assert again == counts
    # the fake server's prose is not a list: every answer is accounted for, nothing crashes;
    # no root gets a child, so each is asked in every round (1 + expansion.retries), with
    # expansion.samples answers a round
    assert counts["answers_unparsed"] + counts["answers_failed"] == counts["requests"]
    assert counts["requests"] == 3 * 2 * 3
    assert counts["per_root"] == {t: {"children": 0, "children_with_2": 0} for t in args["topics"]}
    # a 400 is final (the transient faults are retried until they pass): each one is a
    # failed answer, and the server's fault draw per request is fixed, so this is exact
    assert counts["answers_failed"] == stats["faults"]["bad_request"] == 6
    seeds = load_seeds(out)
    assert [s.topic for s in seeds] == ["Optics", "Genetics", "Poetry"]


async def test_structured_output_bounds_the_answer_and_constrains_the_verdict() -> None:
    # a schema that sets no bounds of its own: the expander bounds it by breadth
    unbounded = {
        "type": "json_schema",
        "json_schema": {
            "name": "subtopics",
            "schema": {
                "type": "object",
                "properties": {"subtopics": {"type": "array", "items": {"type": "string"}}},
                "required": ["subtopics"],
            },
        },
    }
    sent: list[GenerationRequest] = []

    async def complete(requests: Sequence[GenerationRequest]) -> dict[str, GenerationResult]:
        sent.extend(requests)
        out = {}
        for req in requests:
            prompt = req.messages[0].content
            if prompt.startswith("Is "):
                text = json.dumps({"answer": "no" if "Football" in prompt else "yes"})
            else:
                text = json.dumps({"subtopics": ["Alkanes", "Football", "Polymers"]})
            out[req.id] = GenerationResult(request_id=req.id, text=text, finish_reason="stop")
        return out

    expander = TopicExpander(
        complete=complete, model="m", breadth=3, depth=1, response_format=unbounded
    )
    nodes = await expander.expand(["Organic chemistry"])
    assert {n.topic for n in nodes if n.depth == 1} == {"Alkanes", "Polymers"}
    ask, checks = sent[0], sent[1:]
    assert ask.response_format is not None
    array = json.loads(ask.response_format)["json_schema"]["schema"]["properties"]["subtopics"]
    # 2 x breadth candidates asked, exactly: the best `breadth` of them are kept
    assert array["minItems"] == array["maxItems"] == 6
    assert array["items"]["maxLength"] == SCHEMA_TITLE_CHARS
    assert len(checks) == 3
    assert all(json.loads(c.response_format or "null") == RELEVANCE_FORMAT for c in checks)
    assert expander.report.relevance == {"llm_yes": 2, "llm_no": 1}
    assert expander.report.structured_fallbacks == 0


async def test_an_endpoint_that_rejects_response_format_is_asked_plainly(tmp_path: Path) -> None:
    from booksmith.generation.cache import ResponseCache
    from booksmith.generation.client import Endpoint, GenerationClient
    from tests.fakeserver import FakeServer

    with FakeServer({"reject_response_format": True}) as server:
        endpoint = Endpoint(base_url=server.base_url, model="fake-model", max_retries=0)
        client = GenerationClient(endpoint, cache=ResponseCache(tmp_path / "cache.sqlite"))

        async def complete(requests: Sequence[GenerationRequest]) -> dict[str, GenerationResult]:
            report = await client.run(requests)
            return {r.request_id: r for r in report.results}

        expander = TopicExpander(
            complete=complete,
            model="fake-model",
            breadth=3,
            depth=1,
            response_format=subtopics_format(3),
        )
        await expander.expand(["Optics", "Genetics"])
        await expander.expand(["Poetry"])  # known now: asked plainly at once
        stats = server.stats()
    r = expander.report
    assert r.structured_fallbacks == 2
    assert r.requests == 5 and stats["requests"] == 5
    assert stats["faults"] == {"response_format": 2}
    # the plain answers arrived (the fake server's prose is no list, but nothing failed)
    assert r.answers_failed == 0 and r.answers_unparsed == 3


def test_expansion_prompts_are_data_and_render_strictly() -> None:
    """The questions come from prompts/expansion/*.j2; their text is part of every request id
    (the response cache's key), so a change to it shows here, and a variable the caller
    forgot is an error naming it, not an empty string in a prompt."""
    from booksmith.generation.topics import TopicNode, expansion_prompt, relevance_prompt
    from booksmith.prompts import PromptError, render_prompt

    node = TopicNode("Acids", ["Chemistry"], 1)
    assert expansion_prompt(node, 3, ["Bases", "Salts"]) == (
        'What are 3 important subtopics of "Acids" (in Chemistry)? Give short names of specific '
        'concepts, not "Acids" itself, as a JSON list of strings.'
    )
    # a root has no path to show; the structured answer's form is the schema's
    root = TopicNode("Chemistry", [], 0)
    assert expansion_prompt(root, 6, [], structured=True) == (
        'What are 6 important subtopics of "Chemistry"? Give short names of specific concepts, '
        'not "Chemistry" itself.'
    )
    assert relevance_prompt("Strong acids", node) == (
        'Is "Strong acids" a subtopic of "Acids" (Chemistry > Acids) that belongs in a textbook '
        'about it? Answer only "yes" or "no".'
    )
    # topic text is data: template syntax in a title is printed, never evaluated
    assert "{{ 7*7 }}" in relevance_prompt("{{ 7*7 }}", node)
    with pytest.raises(PromptError, match="'breadth' is undefined"):
        render_prompt("expansion/subtopics.j2", topic="Acids", path=["Acids"], existing=[])


@pytest.mark.slow
def test_the_tree_grows_night_by_night(prefect_api: str, tmp_path: Path, write_config) -> None:
    """Two nightly runs with expansion.grow: after the first, the leaves that kept documents
    have new children in <out>/_state/topics.jsonl (marked by the run, the seed file left as
    it was), and the second run plans from them; after it the tree is larger again."""
    from booksmith.flows.nightly import nightly
    from booksmith.generation.grow import grown_path, load_grown
    from tests.conftest import fake_backend_config
    from tests.fakeserver import FakeServer

    topics = tmp_path / "topics.csv"
    seed_file = "topic,subject\nFractions,Mathematics\nVolcanoes,Geology\nHaiku,Arts\n"
    topics.write_text(seed_file)
    out = tmp_path / "out"
    with FakeServer({"structured_output": True}) as server:  # JSON answers to JSON schemas
        cfg = fake_backend_config(server.base_url, out)
        cfg["topics"] = str(topics)
        # the fake server's yes/no is a coin toss: the relevance check is tested above
        cfg["expansion"] = {
            "grow": {"new_topics": 4, "leaves": 2, "breadth": 3},
            "relevance_check": False,
        }
        first = Path(nightly(config=str(write_config(cfg))))
        grown = load_grown(out)
        assert 1 <= len(grown) <= 4, grown
        assert {run for _, run in grown} == {first.name}
        parents = {tuple(s.path) for s, _ in grown}
        assert len(parents) <= 2 and all(len(p) == 1 for p in parents)  # under seed leaves
        assert all(s.subject in ("Mathematics", "Geology", "Arts") for s, _ in grown)
        assert topics.read_text() == seed_file

        cfg["seed"] = 8
        second = Path(nightly(config=str(write_config(cfg, "again.yaml"))))
        planned = pq.read_table(second / "plan.parquet", columns=["topic"])["topic"].to_pylist()
        assert {s.topic for s, _ in grown} <= set(planned)  # the new nodes are planned
        after = load_grown(out)
        assert len(after) > len(grown) and after[: len(grown)] == grown
        assert {run for _, run in after[len(grown) :]} == {second.name}
    assert grown_path(out).is_file()
