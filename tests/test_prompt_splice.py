"""Rendering a template once and splicing per-request values in (prompts.splice), and the
request builder the plan uses: both must give exactly what the plain, slow path gives."""

from __future__ import annotations

import itertools
import random
from pathlib import Path

import pytest

from booksmith.generation.plan import build_plan
from booksmith.generation.seeds import load_seeds
from booksmith.prompts import PromptLibrary
from booksmith.prompts.splice import shape
from booksmith.schemas import GenerationRequest, Message, RequestBuilder, Sampling, TopicSeed
from tests.plan_reference import rebuild_plainly

# Values chosen to break a naive splice: format braces, template syntax, JSON escapes,
# surrogate-free emoji, None and empty values, whitespace at the ends.
TOPICS = ["Photosynthesis", "{0} {{ 7 * 7 }} {% raw %}", ' "quoted" \\ tab\t', "Café ☕ 😀"]
SUBJECTS = [None, "", "Biology", "{x}"]
LISTS = [[], ["One"], ["A {1}", "B", "C } {"]]


def library_with(tmp_path: Path, source: str) -> PromptLibrary:
    templates = tmp_path / "templates"
    templates.mkdir(exist_ok=True)
    (templates / "textbook.j2").write_text(source)
    return PromptLibrary(templates_dir=templates)


def axes_data(lib: PromptLibrary, a: str, s: str, f: str) -> dict[str, object]:
    ax = lib.axes
    return {
        "audience": ax.audiences[a].model_dump(),
        "style": ax.styles[s].model_dump(),
        "format": ax.formats[f].model_dump(),
    }


def first_axes(lib: PromptLibrary) -> dict[str, object]:
    ax = lib.axes
    return axes_data(lib, *[next(iter(x)) for x in (ax.audiences, ax.styles, ax.formats)])


def value_cases(rng: random.Random, n: int) -> list[dict[str, object]]:
    cases = []
    for _ in range(n):
        cases.append(
            {
                "topic": rng.choice(TOPICS),
                "subject": rng.choice(SUBJECTS),
                "path": rng.choice(LISTS),
                "covered": rng.choice(LISTS),
                "seed_words": rng.choice(LISTS),
            }
        )
    return cases


def test_the_bundled_template_splices_to_exactly_the_rendered_text() -> None:
    lib = PromptLibrary()
    assert lib.splice_blockers == {"textbook": None}
    rng = random.Random(0)
    combos = list(itertools.product(lib.axes.audiences, lib.axes.styles, lib.axes.formats))
    splices = {}
    for values in value_cases(rng, 400):
        a, s, f = rng.choice(combos)
        key = (a, s, f, shape(values))
        if key not in splices:
            splices[key] = lib.splice("textbook", **axes_data(lib, a, s, f), **values)
        splice = splices[key]
        assert splice is not None  # the bundled template must take the fast path
        assert splice.fill(values) == lib.render("textbook", **axes_data(lib, a, s, f), **values)
    assert len(splices) < 400  # shapes are shared, not one splice per request


@pytest.mark.parametrize(
    "source",
    [
        "About {{ topic | upper }}, {{ seed_words | join(', ') }}.",  # a filter on the value
        "Words: {{ seed_words | sort | join(', ') }}.",
        "{% for w in seed_words %}{{ w }} {% endfor %}about {{ topic }}.",  # a loop
        "{% if 'x' in topic %}X{% endif %} {{ topic }} {{ path | join('/') }}.",  # a comparison
        "{% set topic = 'fixed' %}Write {{ topic }}.",  # reassigned
        "Write {{ path | join(sep) if false else topic }} {{ covered | length }}.",
    ],
)
def test_templates_that_depend_on_the_values_are_rendered_each_time(
    tmp_path: Path, source: str
) -> None:
    lib = library_with(tmp_path, source.replace("sep", "', '"))
    assert lib.splice_blockers["textbook"]  # the author is told why, at load
    ax = first_axes(lib)
    assert lib.splice("textbook", **ax, **value_cases(random.Random(1), 1)[0]) is None
    assert_plan_matches_plain_rendering(lib, samples=2)


def test_the_blocker_names_the_line_and_the_variable(tmp_path: Path) -> None:
    lib = library_with(tmp_path, "Write about {{ topic }}.\n{{ seed_words | sort | join(', ') }}")
    assert lib.splice_blockers["textbook"] == "line 2: `seed_words` is used in the `sort` filter"


def test_a_value_at_either_end_of_the_text_is_not_spliced(tmp_path: Path) -> None:
    lib = library_with(tmp_path, "{{ topic }} is the topic: {{ seed_words | join(', ') }}")
    ax = first_axes(lib)
    values = {"topic": " padded ", "subject": None, "path": [], "covered": [], "seed_words": ["a"]}
    assert lib.splice("textbook", **ax, **values) is None  # stripping would cut into the value
    assert_plan_matches_plain_rendering(lib, samples=2)


def test_spliceable_templates_with_every_use_match_rendering(tmp_path: Path) -> None:
    source = (
        "{{ format.instructions }} {{ topic }} ({{ subject }}){% if path %} in "
        "{{ path | join(' > ') }}{% endif %}.\n{% if covered %}Not {{ covered | join('; ') }}."
        "{% else %}Nothing covered.{% endif %} {{ topic }} again, {{ path | join }}.\n"
        "{% if seed_words %}Use {{ seed_words | join(', ') }} and {{ seed_words | join('|') }}"
        "{% endif %} {{ audience.reader }}."
    )
    lib = library_with(tmp_path, source)
    rng = random.Random(2)
    ax = first_axes(lib)
    splices = {}
    for values in value_cases(rng, 300):
        key = shape(values)  # one splice serves every request of its shape
        if key not in splices:
            splices[key] = lib.splice("textbook", **ax, **values)
        assert splices[key] is not None
        assert splices[key].fill(values) == lib.render("textbook", **ax, **values)


def assert_plan_matches_plain_rendering(lib: PromptLibrary, samples: int = 3, **kw: object) -> None:
    """Every planned request equals rendering its prompt and building it the plain way."""
    seeds = [
        *load_seeds()[:12],
        TopicSeed(topic="{{ 6 * 7 }} child", subject=None, path=["Root {0}"]),
        TopicSeed(topic="Second child", subject="", path=["Root {0}"]),
    ]
    sampling = kw.pop("sampling", Sampling())
    planned = build_plan(
        seeds,
        lib,
        model="m",
        sampling=sampling,
        seed=4,
        samples_per_topic=samples,
        **kw,  # type: ignore[arg-type]
    )
    expected = rebuild_plainly(
        planned,
        seeds,
        lib,
        model="m",
        sampling=sampling,  # type: ignore[arg-type]
        covered_units=kw.get("covered_units", 6),  # type: ignore[arg-type]
        system_prompt=kw.get("system_prompt"),  # type: ignore[arg-type]
    )
    assert planned == expected


def test_the_plan_equals_rendering_and_building_every_request() -> None:
    lib = PromptLibrary()
    assert_plan_matches_plain_rendering(lib, samples=6)
    assert_plan_matches_plain_rendering(
        lib,
        samples=2,
        system_prompt='You teach. {0} "q"',
        sampling=Sampling(seed=9, frequency_penalty=0.5),
        seed_words=0,
        covered_units=0,
    )
    # the same prompt twice: the sample index (and so id and seed) tells them apart
    assert_plan_matches_plain_rendering(lib, samples=40, vocabulary=["a", "b"], seed_words=1)


@pytest.mark.parametrize("system", [None, 'Be "brief" {0} é'])
@pytest.mark.parametrize("sampling", [Sampling(), Sampling(seed=3, presence_penalty=0.2)])
def test_request_builder_equals_build(system: str | None, sampling: Sampling) -> None:
    builder = RequestBuilder(model='m "{x}"', sampling=sampling, system_prompt=system)
    for prompt in ["Explain fractions.", "", '{0} {seed} \\ "\n\x00 😀', "x" * 5000]:
        for index in (0, 7):
            messages = [Message(role="system", content=system)] if system else []
            expected = GenerationRequest.build(
                messages=[*messages, Message(role="user", content=prompt)],
                model='m "{x}"',
                sampling=sampling,
                sample_index=index,
                topic="t",
            )
            got = builder.build(prompt, index, topic="t")
            assert got == expected
            assert got.model_dump_json() == expected.model_dump_json()


def test_request_builder_refuses_what_it_does_not_key() -> None:
    builder = RequestBuilder(model="m", sampling=Sampling())
    with pytest.raises(TypeError, match="response_format"):
        builder.build("x", 0, response_format='{"type": "json_object"}')
