"""The plan stage, the prompt library and the records it produces."""

from __future__ import annotations

import itertools
import re
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pytest

from booksmith.generation.plan import build_plan
from booksmith.generation.seeds import load_seeds
from booksmith.prompts import PromptError, PromptLibrary, load_seed_words
from booksmith.schemas import (
    Document,
    GenerationRequest,
    Rejected,
    Sampling,
    TopicSeed,
    arrow_schema,
)
from booksmith.schemas.arrow import to_table
from booksmith.schemas.config import ConfigError, RunConfig, load_config


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


def render_vars(lib: PromptLibrary, **kw: object) -> dict[str, object]:
    ax = lib.axes
    base: dict[str, object] = {
        "topic": "Photosynthesis",
        "path": ["Biology", "Cell biology"],
        "subject": "Biology",
        "audience": ax.audiences["college"],
        "style": ax.styles["academic"],
        "format": ax.formats["exercises"],
        "seed_words": [],
        "covered": [],
    }
    base.update(kw)
    return base


def test_topic_text_is_data_not_template_code() -> None:
    lib = PromptLibrary()
    out = lib.render("textbook", **render_vars(lib, topic="{{ 7 * 7 }} {% raw %}"))
    assert "{{ 7 * 7 }} {% raw %}" in out and "49" not in out


def tokens(text: str) -> set[str]:
    return set(re.findall(r"\w+", text.lower()))


def test_audiences_really_differ() -> None:
    """Any two audiences' prompts for one topic and format share under half their tokens."""
    lib = PromptLibrary()
    for fmt in lib.axes.formats.values():
        prompts = [
            lib.render("textbook", **render_vars(lib, audience=a, format=fmt))
            for a in lib.axes.audiences.values()
        ]
        for x, y in itertools.combinations(prompts, 2):
            jaccard = len(tokens(x) & tokens(y)) / len(tokens(x) | tokens(y))
            assert jaccard < 0.5, (x, y)


def test_template_errors_fail_when_the_library_loads(tmp_path: Path) -> None:
    templates = tmp_path / "templates"
    templates.mkdir()
    (templates / "textbook.j2").write_text("{{ format.instructions }} {{ topik }}")
    with pytest.raises(PromptError, match=r"textbook.*undefined variable\(s\) \['topik'\]"):
        PromptLibrary(templates_dir=templates)
    (templates / "textbook.j2").write_text("{{ audience.reeder }} {{ topic }}")
    with pytest.raises(PromptError, match=r"textbook.*reeder"):
        PromptLibrary(templates_dir=templates)
    with pytest.raises(PromptError, match="no template 'nope'"):
        PromptLibrary().render("nope")


def test_axis_yaml_errors_name_the_key(tmp_path: Path) -> None:
    axes = tmp_path / "axes.yaml"
    axes.write_text("audiences: {a: {weight: -1, reader: x}}\nstyles: {}\nformats: {}\n")
    with pytest.raises(PromptError) as err:
        PromptLibrary(axes_path=axes)
    message = str(err.value)
    assert "audiences.a.weight" in message and "audiences.a.depth" in message
    assert "styles" in message


def test_default_run_uses_every_format_and_audience() -> None:
    requests = plan(limit=24)
    axes = PromptLibrary().axes
    assert {r.audience for r in requests} == set(axes.audiences)
    assert {r.format for r in requests} == set(axes.formats)
    assert {r.style for r in requests} == set(axes.styles)
    # a format restricted to some subjects only goes to those
    for r in requests:
        assert axes.formats[r.format].applies_to(r.subject), (r.format, r.subject)
    assert any(r.format == "code_tutorial" for r in requests)


def test_seed_words_and_covered_units_reach_the_prompt() -> None:
    requests = plan(limit=None)
    vocabulary = set(load_seed_words())
    assert len(vocabulary) >= 2000
    for r in requests:
        assert len(r.seed_words) == 3 and set(r.seed_words) <= vocabulary
        assert all(w in r.prompt for w in r.seed_words)
    second = next(r for r in requests if r.topic == "Quadratic equations and the quadratic formula")
    assert "Solving linear equations" in second.prompt  # an earlier sibling is covered
    first = next(r for r in requests if r.topic == "Solving linear equations")
    assert "already cover" not in first.prompt
    none = plan(limit=5, seed_words=0, covered_units=0)
    assert all(not r.seed_words and "already cover" not in r.prompt for r in none)


def test_no_combination_dominates_a_large_plan() -> None:
    requests = plan(limit=None, samples_per_topic=20)
    pairs = Counter((r.audience, r.format) for r in requests)
    general = [p for p in pairs if p[1] != "code_tutorial"]
    axes = PromptLibrary().axes
    assert len(general) == len(axes.audiences) * (len(axes.formats) - 1)
    # each pair's count is within 25% of audience share x format share
    n = len(requests)
    a_total = sum(v.weight for v in axes.audiences.values())
    aud = Counter(r.audience for r in requests)
    fmt = Counter(r.format for r in requests)
    for a, f in general:
        expected = aud[a] * fmt[f] / n
        assert abs(pairs[(a, f)] - expected) <= 0.25 * expected + 2, (a, f)
    for a, value in axes.audiences.items():
        assert abs(aud[a] / n - value.weight / a_total) < 0.01


def test_plan_parquet_is_byte_identical_for_the_same_seed(tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    for name in ("a", "b"):
        pq.write_table(to_table(plan(3), GenerationRequest), tmp_path / f"{name}.parquet")
    assert (tmp_path / "a.parquet").read_bytes() == (tmp_path / "b.parquet").read_bytes()


def test_arrow_schemas_derive_from_the_records() -> None:
    schema = arrow_schema(Document)
    assert schema.names == list(Document.model_fields)
    assert schema.field("topic_path").type == pa.list_(pa.string())
    assert schema.field("quality_score").nullable and not schema.field("text").nullable
    assert arrow_schema(Rejected).names[-3:] == ["reason", "duplicate_of", "detail"]
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


_META = {
    "topic": "Fractions",
    "topic_path": ["Fractions"],
    "audience": "a",
    "style": "s",
    "format": "f",
    "seed_words": [],
    "template": "t",
}


def test_penalties_enter_the_request_key_only_when_set() -> None:
    msgs = [{"role": "user", "content": "Explain fractions."}]
    plain = GenerationRequest.build(messages=msgs, model="m", sampling=Sampling(), **_META)
    zero = Sampling(frequency_penalty=0.0)
    assert "frequency_penalty" not in Sampling().key_fields()
    assert zero.key_fields()["frequency_penalty"] == 0.0
    penalised = GenerationRequest.build(messages=msgs, model="m", sampling=zero, **_META)
    assert penalised.id != plain.id
    again = GenerationRequest.build(messages=msgs, model="m", sampling=Sampling(), **_META)
    assert again.id == plain.id
