"""The plan stage, the prompt library and the records it produces."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pyarrow as pa
import pytest

from generation.plan import build_plan
from generation.seeds import load_seeds
from prompts import PromptError, PromptLibrary
from schemas import Document, GenerationRequest, Rejected, Sampling, TopicSeed, arrow_schema
from schemas.arrow import to_table
from schemas.config import ConfigError, RunConfig, load_config


def plan(seed: int = 1, limit: int | None = 24, **kw: object) -> list[GenerationRequest]:
    return build_plan(
        load_seeds(), PromptLibrary(), model="m", sampling=Sampling(), seed=seed, limit=limit, **kw
    )  # type: ignore[arg-type]


def test_plan_is_deterministic_from_the_seed() -> None:
    a, b, c = plan(1), plan(1), plan(2)
    assert [r.model_dump() for r in a] == [r.model_dump() for r in b]
    assert [r.id for r in a] != [r.id for r in c]
    assert len({r.id for r in a}) == len(a) == 24


def test_limit_is_a_stratified_sample_and_axes_are_balanced() -> None:
    requests = plan(limit=27)
    subjects = Counter(r.subject for r in requests)
    assert len(subjects) == 9 and max(subjects.values()) - min(subjects.values()) <= 1
    axes = PromptLibrary().axes
    audiences = Counter(r.audience for r in requests)
    assert set(audiences) == set(axes.audiences)  # every value used, in proportion to weight
    total_w = sum(v.weight for v in axes.audiences.values())
    for name, value in axes.audiences.items():
        assert abs(audiences[name] - 27 * value.weight / total_w) <= 1.5, name
    assert set(r.format for r in requests) == set(axes.formats)


def test_full_plan_covers_every_topic_with_weights() -> None:
    seeds = [TopicSeed(topic="A"), TopicSeed(topic="B", weight=3)]
    requests = build_plan(
        seeds, PromptLibrary(), model="m", sampling=Sampling(), seed=0, samples_per_topic=2
    )
    assert Counter(r.topic for r in requests) == {"A": 2, "B": 6}
    assert len({r.id for r in requests}) == 8
    assert len({r.sampling.seed for r in requests}) == 8


def test_topic_text_is_data_not_template_code() -> None:
    lib = PromptLibrary()
    ax = lib.axes
    out = lib.render(
        "textbook",
        topic="{{ 7 * 7 }} {% raw %}",
        path=[],
        audience=ax.audiences["college"],
        style=ax.styles["academic"],
        format=ax.formats["exercises"],
        seed_words=[],
    )
    assert "{{ 7 * 7 }} {% raw %}" in out and "49" not in out


def test_missing_template_variable_and_unknown_template_fail_clearly(tmp_path: Path) -> None:
    lib = PromptLibrary()
    with pytest.raises(PromptError, match="template 'textbook': 'format' is undefined"):
        lib.render("textbook", topic="x", path=[], seed_words=[])
    with pytest.raises(PromptError, match="no template 'nope'"):
        lib.render("nope")


def test_axis_yaml_errors_name_the_key(tmp_path: Path) -> None:
    axes = tmp_path / "axes.yaml"
    axes.write_text("audiences: {a: {weight: -1, instructions: x}}\nstyles: {}\nformats: {}\n")
    with pytest.raises(PromptError) as err:
        PromptLibrary(axes_path=axes)
    assert "audiences.a.weight" in str(err.value) and "styles" in str(err.value)


def test_arrow_schemas_derive_from_the_records() -> None:
    schema = arrow_schema(Document)
    assert schema.names == list(Document.model_fields)
    assert schema.field("topic_path").type == pa.list_(pa.string())
    assert schema.field("quality_score").nullable and not schema.field("text").nullable
    assert arrow_schema(Rejected).names[-2:] == ["reason", "duplicate_of"]
    reqs = plan(limit=3)
    table = to_table(reqs, GenerationRequest)
    assert table.num_rows == 3
    back = [GenerationRequest.model_validate(r) for r in table.to_pylist()]
    assert back == reqs


def test_request_ids_hash_the_request_key() -> None:
    msgs = [{"role": "user", "content": "x"}]
    a = GenerationRequest.build(messages=msgs, model="m", sampling=Sampling())
    assert a.id == GenerationRequest.build(messages=msgs, model="m", sampling=Sampling()).id
    assert a.id != GenerationRequest.build(messages=msgs, model="m2", sampling=Sampling()).id
    hotter = Sampling(temperature=1.0)
    assert a.id != GenerationRequest.build(messages=msgs, model="m", sampling=hotter).id
    fixed = GenerationRequest.build(messages=msgs, model="m", sampling=Sampling(seed=5))
    assert fixed.sampling.seed == 5


def test_config_defaults_and_errors(tmp_path: Path) -> None:
    assert load_config(None) == RunConfig()
    path = tmp_path / "c.yaml"
    path.write_text("output:\n  shard_rows: 0\nplan: [1]\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    msg = str(err.value)
    assert f"{path}:2: output.shard_rows" in msg and "greater than or equal to 1" in msg
    assert f"{path}:3: plan" in msg
    path.write_text("a: [\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(path)
    assert load_config(None, {"plan.limit": 5, "seed": None}).plan.limit == 5
