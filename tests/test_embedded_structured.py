"""Structured output on the embedded backend: response_format compiled to a grammar that the
batched engine enforces per sequence; schemas it cannot enforce are refused (fail closed)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import jsonschema
import openai
import pytest

from booksmith.generation.embedded import EmbeddedServer
from booksmith.generation.embedded.server import (
    BadRequestError,
    response_format_grammar,
    schema_grammar,
)

OUTLINE = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "minLength": 1, "maxLength": 40},
        "level": {"enum": ["basic", "advanced"]},
        "sections": {
            "type": "array",
            "items": {"type": "string", "minLength": 1, "maxLength": 24},
            "minItems": 2,
            "maxItems": 3,
        },
        "pages": {"type": "integer"},
    },
    "required": ["title", "level", "sections", "pages"],
    "additionalProperties": False,
}


def json_schema(schema: dict[str, Any], name: str = "answer") -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema}}


# -- without the model: the schema -> grammar step ----------------------------------------------


def test_a_grammar_is_compiled_once_per_schema() -> None:
    schema_grammar.cache_clear()
    first = response_format_grammar(json_schema(json.loads(json.dumps(OUTLINE))))
    second = response_format_grammar(json_schema(json.loads(json.dumps(OUTLINE)), "other"))
    info = schema_grammar.cache_info()
    assert first == second and (info.misses, info.hits) == (1, 1)
    assert 'level ::= "\\"basic\\"" | "\\"advanced\\""' in first
    # strings may not carry raw control characters (JSON forbids them)
    assert "\\x00-\\x1F" in first


UNSUPPORTED = [
    ({"type": "integer", "minimum": 3}, "'minimum' at schema"),
    (
        {"type": "object", "properties": {"code": {"type": "string", "pattern": "^[A-Z]+$"}}},
        "'pattern' at schema.properties.code",
    ),
    ({"oneOf": [{"type": "string"}, {"type": "integer"}]}, "'oneOf' at schema"),
    (
        {"type": "array", "items": {"type": "string", "format": "email"}},
        "'format' 'email' at schema.items",
    ),
    ({"$ref": "https://example.com/schema.json"}, "'$ref'"),
    ({"type": "object", "required": ["name"]}, "'required' 'name'"),
    ({"type": "array", "items": {"type": "string"}, "uniqueItems": True}, "'uniqueItems'"),
]


@pytest.mark.parametrize(("schema", "named"), UNSUPPORTED)
def test_a_schema_the_grammar_cannot_enforce_is_refused_by_name(
    schema: dict[str, Any], named: str
) -> None:
    with pytest.raises(BadRequestError) as info:
        response_format_grammar(json_schema(schema))
    assert named in str(info.value) and info.value.param == "response_format"


# -- on the model ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedServer]:
    log = tmp_path_factory.mktemp("structured") / "server.log"
    with EmbeddedServer(n_parallel=4, ctx_per_seq=512, log_path=log) as running:
        yield running


def _client(server: EmbeddedServer) -> Any:
    return openai.AsyncOpenAI(base_url=server.base_url, api_key="unused", max_retries=0)


async def _ask(server: EmbeddedServer, asks: Sequence[dict[str, Any]]) -> list[Any]:
    client = _client(server)
    try:
        return list(
            await asyncio.gather(
                *(client.chat.completions.create(model="m", **ask) for ask in asks)
            )
        )
    finally:
        await client.close()


def _user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


TOPICS = ["volcanoes", "fractions", "the French Revolution", "photosynthesis"]


@pytest.mark.e2e
@pytest.mark.slow
async def test_json_schema_answers_always_validate(server: EmbeddedServer) -> None:
    asks = [
        {
            "messages": _user(f"Outline a short textbook chapter about {topic} as JSON."),
            "response_format": json_schema(OUTLINE),
            "max_tokens": 160,  # more than the schema's longest answer
            "temperature": 1.0,  # wide sampling: the grammar, not the model, keeps it valid
            "seed": seed,
        }
        for seed, topic in enumerate(TOPICS)
    ]
    for response in await _ask(server, asks):
        choice = response.choices[0]
        assert choice.finish_reason == "stop", choice.message.content
        jsonschema.validate(json.loads(choice.message.content), OUTLINE)


@pytest.mark.e2e
@pytest.mark.slow
async def test_json_object_answers_parse(server: EmbeddedServer) -> None:
    asks = [
        {
            "messages": _user(f"Describe {topic} as a JSON object with a name and a year."),
            "response_format": {"type": "json_object"},
            "max_tokens": 120,
            "temperature": 0.7,
            "seed": 0,  # an unbounded object may run on; with these seeds each one closes
        }
        for topic in TOPICS
    ]
    for response in await _ask(server, asks):
        choice = response.choices[0]
        assert choice.finish_reason == "stop", choice.message.content
        assert isinstance(json.loads(choice.message.content), dict)


@pytest.mark.e2e
@pytest.mark.slow
async def test_constrained_and_plain_requests_share_a_batch(server: EmbeddedServer) -> None:
    plain = {"messages": _user("Name three rivers."), "max_tokens": 40, "seed": 5}
    constrained = {
        "messages": _user("Outline a chapter about rivers as JSON."),
        "response_format": json_schema(OUTLINE),
        "max_tokens": 160,
        "temperature": 0.8,
        "seed": 5,
    }
    (solo,) = await _ask(server, [plain])
    together = await _ask(server, [plain, constrained])
    assert together[0].choices[0].message.content == solo.choices[0].message.content
    answer = together[1].choices[0]
    assert answer.finish_reason == "stop"
    jsonschema.validate(json.loads(answer.message.content), OUTLINE)


@pytest.mark.e2e
@pytest.mark.slow
async def test_unsupported_schema_is_a_400_naming_the_part(server: EmbeddedServer) -> None:
    client = _client(server)
    schema = {"type": "object", "properties": {"age": {"type": "integer", "maximum": 130}}}
    with pytest.raises(openai.BadRequestError) as info:
        await client.chat.completions.create(
            model="m",
            messages=_user("How old?"),
            response_format=json_schema(schema),  # type: ignore[arg-type]
            max_tokens=8,
        )
    await client.close()
    error = info.value.body
    assert error["param"] == "response_format" and error["code"] == "unsupported_schema"
    assert "'maximum' at schema.properties.age" in error["message"]


@pytest.mark.e2e
@pytest.mark.slow
async def test_expansion_answers_parse_on_the_embedded_model(
    server: EmbeddedServer, tmp_path: Path
) -> None:
    from booksmith.generation.client import Endpoint, GenerationClient
    from booksmith.generation.topics import TopicExpander, subtopics_format
    from booksmith.schemas import GenerationRequest, GenerationResult, Sampling

    endpoint = Endpoint(base_url=server.base_url, model="m", backend="embedded")
    client = GenerationClient(endpoint)
    answers: list[tuple[GenerationRequest, GenerationResult]] = []

    async def complete(requests: Sequence[GenerationRequest]) -> dict[str, GenerationResult]:
        report = await client.run(requests)
        by_id = {r.request_id: r for r in report.results}
        answers.extend((q, by_id[q.id]) for q in requests)
        return by_id

    expander = TopicExpander(
        complete=complete,
        model="m",
        breadth=3,
        depth=1,
        sampling=Sampling(max_tokens=160, temperature=0.7, top_p=0.95, presence_penalty=0.8),
        response_format=subtopics_format(3),
        seed=3,
    )
    await expander.expand(["Plate tectonics", "Organic chemistry", "Linear algebra"])
    report = expander.report
    assert report.answers_failed == 0 and report.answers_unparsed == 0
    assert report.structured_fallbacks == 0
    assert report.relevance["lexical"] == 0  # every verdict parsed
    # every constrained answer is its schema's instance: 6 titles (2 x breadth), an enum verdict
    assert len(answers) == report.requests >= 3 + 3
    for request, result in answers:
        assert result.ok, result.error
        fmt = json.loads(request.response_format or "null")
        jsonschema.validate(json.loads(result.text), fmt["json_schema"]["schema"])
    asks = [json.loads(r.text)["subtopics"] for q, r in answers if "subtopics" in r.text]
    assert len(asks) == 3 and all(len(titles) == 6 for titles in asks)


@pytest.mark.e2e
@pytest.mark.slow
def test_the_engine_compiles_a_grammar_once_and_refuses_a_broken_one() -> None:
    from booksmith.generation.embedded import prepared_model
    from booksmith.generation.embedded.engine import (
        Engine,
        EngineConfig,
        GrammarError,
        SamplingParams,
    )

    grammar = response_format_grammar(json_schema(OUTLINE))
    assert grammar is not None
    with Engine(prepared_model(), EngineConfig(n_parallel=2, ctx_per_seq=256)) as engine:
        params = SamplingParams(max_tokens=6, temperature=0.0, grammar=grammar)
        futures = [engine.submit_chat(_user("Outline rivers."), params)[0] for _ in range(3)]
        texts = [future.result().text for future in futures]
        assert texts[0] == texts[1] == texts[2] and texts[0].replace(" ", "").startswith('{"title')
        assert engine.grammars_compiled == 1
        with pytest.raises(GrammarError):  # fail closed: never generate without the grammar
            engine.submit_chat(_user("x"), SamplingParams(grammar="root ::= undefined-rule"))
        assert engine.load()["queued"] == 0
