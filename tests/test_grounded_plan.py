"""Grounded planning on real text that ships with Python (pydoc_data.topics: the language
reference's topics, 79 records, 465k characters): passages, the source stream in bounded
memory, deterministic selection with no repeats across runs, routing by quality band, the
pre-generation filters, the mix with topics, bad input, licences on the card, and shards of
the schema before the grounding columns."""

from __future__ import annotations

import json
import pydoc_data.topics
import tracemalloc
from collections import Counter
from pathlib import Path
from typing import Any

import fsspec
import pyarrow as pa
import pytest

from booksmith.filters import sources as sources_module
from booksmith.filters.heuristic_score import heuristic_score
from booksmith.filters.inputs import InputError
from booksmith.filters.source_gate import SourceGate
from booksmith.filters.sources import Source
from booksmith.generation.passages import cut_passages
from booksmith.generation.source_state import planned_passages, record_planned
from booksmith.pipeline import grounded as grounded_module
from booksmith.pipeline.grounded import MixedPlan, SourcePlan, split_by_shares
from booksmith.prompts import PromptError
from booksmith.schemas import SCHEMA_VERSION, Document, GenerationRequest, arrow_schema
from booksmith.schemas.arrow import conform, versioned_schema
from booksmith.schemas.config import ConfigError, RunConfig, load_config
from booksmith.schemas.grounding_settings import SourceSpec
from booksmith.schemas.manifest import Counts, Manifest, PlanCounts
from booksmith.schemas.records import GROUNDING_COLUMNS
from booksmith.shards.card import front_matter
from booksmith.shards.card_sources import card_license
from booksmith.shards.encodings import get_encoding

TOPICS: dict[str, str] = pydoc_data.topics.topics


def write_source(path: Path, copies: int = 1, **extra: Any) -> Path:
    """pydoc's topics as `{id, text, license, title}` records (`copies` with distinct ids)."""
    with path.open("w", encoding="utf-8") as f:
        for c in range(copies):
            for name, text in TOPICS.items():
                rid = name if c == 0 else f"{name}#{c}"
                record = {"id": rid, "text": text, "license": "PSF-2.0", "title": name, **extra}
                f.write(json.dumps(record) + "\n")
    return path


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_source(tmp_path_factory.mktemp("src") / "pydoc.jsonl")


def config(out: Path, *paths: Path | str, **over: Any) -> RunConfig:
    data: dict[str, Any] = {
        "seed": 11,
        "output": {"dir": str(out)},
        "plan": {"limit": 24},
        "sources": [{"path": str(p)} for p in paths],
    }
    for key, value in over.items():
        data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
    return RunConfig.model_validate(data)


def plan(
    cfg: RunConfig, seeds: list[Any] | None = None
) -> tuple[list[GenerationRequest], MixedPlan]:
    mixed = MixedPlan(cfg, seeds or [], cfg.seed or 0)
    return list(mixed.requests()), mixed


# -- passages ----------------------------------------------------------------------------------


def test_passages_are_cut_on_paragraph_boundaries_within_the_window() -> None:
    enc = get_encoding("cl100k_base")
    count = lambda text: len(enc.encode_ordinary(text))  # noqa: E731
    total = 0
    for text in TOPICS.values():
        passages = cut_passages(text, count, 64, 256)
        end = 0
        for k, p in enumerate(passages):
            assert p.index == k and p.text == text[p.start : p.end] and p.start >= end
            assert 64 <= p.n_tokens == count(p.text) <= 256
            # a passage starts where a paragraph, a line or (rarely) a word does
            assert p.start == 0 or text[p.start - 1].isspace()
            end = p.end
        total += len(passages)
        if text.count("\n\n") > 4 and sum(p.n_tokens for p in passages) > 1000:
            # paragraphs are joined up to the window, not one passage each
            assert len(passages) < text.count("\n\n")
    assert total > 300


def test_passages_stay_in_the_window_when_a_count_is_not_additive() -> None:
    """Joins are taken by a bound on the joined count; where the bound fails (here a count that
    grows faster than its parts'), the record is packed again counting every join."""
    count = lambda text: len(text) * len(text) // 4000  # noqa: E731
    text = TOPICS["assignment"]
    passages = cut_passages(text, count, 16, 300)
    assert passages and all(16 <= p.n_tokens == count(p.text) <= 300 for p in passages)


# -- the stream --------------------------------------------------------------------------------


def test_a_source_streams_in_bounded_memory(tmp_path: Path, monkeypatch: Any) -> None:
    """12 MB of records planned with a peak of Python memory far below the source's size (it
    stays about 3.4 MB for 5 or 10 MB: a batch of records, the gate's batch, the plan)."""
    big = write_source(tmp_path / "big.jsonl", copies=25)
    size = big.stat().st_size
    assert size > 11_000_000
    monkeypatch.setattr(sources_module, "BATCH_RECORDS", 100)
    cfg = config(tmp_path / "out", big, grounding={"max_tokens": 256}, plan={"limit": 8})
    mixed = MixedPlan(cfg, [], 11)
    tracemalloc.start()
    try:
        requests = list(mixed.requests())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(requests) == 8
    assert mixed.account()["big.jsonl"]["records"] == 25 * len(TOPICS)
    # (read whole, or in batches of a thousand records, the peak passes 20 MB)
    assert peak < size / 3, f"peak {peak:,} bytes for a {size:,}-byte source"


def test_jsonl_parquet_folder_and_url_give_the_same_records(source: Path, tmp_path: Path) -> None:
    rows = [json.loads(line) for line in source.read_text().splitlines()]
    folder = tmp_path / "_in" / "folder"  # (a folder under one named _...: still read)
    (folder / "_state").mkdir(parents=True)
    (folder / "_state" / "skipped.jsonl").write_text('{"id": "x", "text": "not a record"}\n')
    pa.parquet.write_table(pa.Table.from_pylist(rows[:40]), folder / "a.parquet")
    (folder / "b.jsonl").write_text("\n".join(json.dumps(r) for r in rows[40:]) + "\n")
    fs = fsspec.filesystem("memory")
    fs.pipe("/grounded/pydoc.jsonl", source.read_bytes())

    def records(path: str) -> list[tuple[str, str, str | None]]:
        return [
            (r.id, r.text, r.license) for b in Source(SourceSpec(path=path)).batches() for r in b
        ]

    expected = [(r["id"], r["text"], r["license"]) for r in rows]
    assert records(str(source)) == expected
    assert records(str(folder)) == expected
    assert records("memory://grounded/pydoc.jsonl") == expected


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"id": "a", "text": "x"}\n{"id": "b"}\n', "bad.jsonl:2: no `text` field"),
        ('{"id": "a", "text": "x"}\n{"text": "y"}\n', "bad.jsonl:2: no `id` field"),
        ('{"id": "a", "text": 5}\n', "bad.jsonl:1: `text` must be a string"),
        ('{"id": "a", "text": "x"}\nnot json\n', "bad.jsonl:2: invalid JSON"),
    ],
)
def test_bad_records_name_the_file_and_line(tmp_path: Path, content: str, message: str) -> None:
    (tmp_path / "bad.jsonl").write_text(content)
    with pytest.raises(InputError, match=message.replace("`", ".")):
        plan(config(tmp_path / "out", tmp_path / "bad.jsonl"))


def test_a_missing_source_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"nowhere\.jsonl: source not found \(sources\[\]\.path\)"):
        plan(config(tmp_path / "out", tmp_path / "nowhere.jsonl"))


def test_two_sources_of_one_name_are_refused(source: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.mkdir()
    twin = write_source(other / "pydoc.jsonl")
    with pytest.raises(ConfigError, match=r"sources: two sources are named alike .*give each a"):
        plan(config(tmp_path / "out", source, twin))


# -- which passages a run takes ------------------------------------------------------------------


def _passages(requests: list[GenerationRequest]) -> set[tuple[str | None, int | None]]:
    return {(r.source_id, r.source_passage) for r in requests}


def test_selection_is_deterministic_and_later_runs_take_new_passages(
    source: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    first, mixed = plan(config(out, source))
    again, _ = plan(config(out, source))
    assert [r.id for r in first] == [r.id for r in again] and len(first) == 24
    other, _ = plan(config(out, source, seed=12))
    assert _passages(other) != _passages(first)
    # spread over the source, not its first records
    assert len({r.source_id for r in first}) > 10
    record_planned(out, "run1", mixed.keys())
    assert planned_passages(out).size == 24
    later, later_plan = plan(config(out, source))
    assert len(later) == 24 and not _passages(later) & _passages(first)
    account = later_plan.account()["pydoc.jsonl"]
    assert account["planned_before"] == 24 and account["passages"] > 250
    repeat, _ = plan(config(out, source, grounding={"repeat": "any"}))
    assert [r.id for r in repeat] == [r.id for r in first]


def test_the_run_replays_its_estimates_selection_and_cuts_only_candidate_records(
    tmp_path: Path, monkeypatch: Any
) -> None:
    """The estimate plans the first round and the run plans it again from the estimate's
    selections and filter verdicts: the same requests and account, with no selecting pass, no
    filtering, and a planning pass that cuts only the records holding candidates. Every record
    is in the source twice (one passage key, so one draw, in two records: a tie at the
    selection's bound keeps both) and French records make the filters ask for further rounds.
    Cutting every record in every pass, as before, plans the same."""
    src = tmp_path / "twice.jsonl"
    french = "Le chat dort sur le canapé pendant que la pluie tombe doucement sur les toits."
    with src.open("w", encoding="utf-8") as f:
        for name, text in TOPICS.items():
            f.write((json.dumps({"id": name, "text": text}) + "\n") * 2)
        for i in range(100):
            f.write(json.dumps({"id": f"fr{i}", "text": f"{i}. " + " ".join([french] * 12)}))
            f.write("\n")
    cfg = config(tmp_path / "out", src, plan={"limit": 31}, grounding={"oversample": 1.0})
    cut: Counter[str] = Counter()
    real_cut = grounded_module.cut_passages

    def counting_cut(text: str, *args: Any) -> Any:
        cut[text] += 1
        return real_cut(text, *args)

    monkeypatch.setattr(grounded_module, "cut_passages", counting_cut)
    estimated = MixedPlan(cfg, [], 11)
    first = [r.model_dump() for r in estimated.requests()]
    account = estimated.account()["twice.jsonl"]
    assert len(first) == 31 and account["records"] == 2 * len(TOPICS) + 100
    assert account["rejected"]["lang:fr"] > 0  # (so more than one round)
    replayed = estimated.again()
    cut.clear()
    with monkeypatch.context() as m:  # the estimate's verdicts are replayed, not asked again
        m.setattr(SourceGate, "run", lambda *_: pytest.fail("candidates filtered again"))
        assert [r.model_dump() for r in replayed.requests()] == first
    assert replayed.account()["twice.jsonl"] == account
    assert replayed.keys() == estimated.keys()
    # records cut: those holding a candidate, both copies (a tie taken twice) in each round
    assert 0 < sum(cut.values()) <= account["candidates"] < account["records"]
    assert all(n % 2 == 0 for text, n in cut.items() if not text[0].isdigit())

    def cut_everything(self: SourcePlan, above: int) -> tuple[int | None, None]:
        return real_select(self, above)[0], None

    real_select = SourcePlan._select
    monkeypatch.setattr(SourcePlan, "_select", cut_everything)
    assert [r.model_dump() for r in MixedPlan(cfg, [], 11).requests()] == first


def test_the_run_plans_from_its_estimates_plan(
    source: Path, tmp_path: Path, monkeypatch: Any
) -> None:
    """announce_estimate hands the run its plan: the run's first round (Rounds, as StreamingRun
    makes it) neither selects nor filters again, and plans what the estimate counted."""
    import logging

    from booksmith.flows import nightly
    from booksmith.pipeline.rounds import Rounds

    monkeypatch.setattr(nightly, "get_run_logger", lambda: logging.getLogger("test"))
    cfg = config(tmp_path / "out", source)
    est, grounded = nightly.announce_estimate(cfg, [], 11)
    assert grounded is not None
    monkeypatch.setattr(SourcePlan, "_select", lambda *_: pytest.fail("selected again"))
    monkeypatch.setattr(SourceGate, "run", lambda *_: pytest.fail("filtered again"))
    rounds = Rounds([], cfg, 11, grounded=grounded)
    planned = [r for chunk in rounds.first() for r in chunk.plan]
    assert len(planned) == est.requests == 24


def test_every_request_records_its_passage(source: Path, tmp_path: Path) -> None:
    requests, mixed = plan(config(tmp_path / "out", source))
    account = mixed.account()["pydoc.jsonl"]
    for r in requests:
        text = TOPICS[r.source_id or ""]
        assert r.source_start is not None and r.source_end is not None
        assert text[r.source_start : r.source_end] in r.prompt
        assert r.source_name == "pydoc.jsonl" and r.license == "PSF-2.0"
        assert r.source_checksum == account["checksum"] and len(r.source_checksum) == 64
        assert r.recipe and r.template_version and len(r.template_version) == 12
    edited = tmp_path / "edited.jsonl"
    edited.write_text(source.read_text().replace("assignment", "Assignment", 1))
    _, other = plan(config(tmp_path / "out", edited))
    assert other.account()["edited.jsonl"]["checksum"] != account["checksum"]


# -- routing ---------------------------------------------------------------------------------


def test_passages_go_to_the_recipes_of_their_quality_band(source: Path, tmp_path: Path) -> None:
    routes = [
        {"min_score": 0.0, "max_score": 0.72, "recipes": ["wikipedia_rephrase"]},
        {"min_score": 0.72, "max_score": 0.78, "recipes": ["textbook_unit", "qa_rephrase"]},
        {"min_score": 0.78, "max_score": 1.0, "recipes": ["distill", "knowledge_list"]},
    ]
    cfg = config(tmp_path / "out", source, plan={"limit": 60},
                 grounding={"routes": routes, "recipes_per_passage": 2})  # fmt: skip
    requests, _ = plan(cfg)
    by_passage: dict[tuple[str | None, int | None], list[GenerationRequest]] = {}
    for r in requests:
        by_passage.setdefault((r.source_id, r.source_passage), []).append(r)
    bands = Counter()
    for reqs in by_passage.values():
        text = TOPICS[reqs[0].source_id or ""][reqs[0].source_start : reqs[0].source_end]
        score = heuristic_score(text)
        band = next(i for i, r in enumerate(routes) if r["min_score"] <= score < r["max_score"])
        expected = routes[band]["recipes"][:2]
        assert sorted(r.recipe or "" for r in reqs) == sorted(expected[: len(reqs)])
        assert len(reqs) == min(2, len(routes[band]["recipes"]))
        bands[band] += 1
    assert len(bands) == 3, f"the test wants passages in every band: {bands}"
    textbook = [r for r in requests if r.recipe == "textbook_unit"]
    assert textbook and all(r.audience and r.style and r.format for r in textbook)
    assert all(not r.audience for r in requests if r.recipe == "distill")


def test_a_route_to_an_unknown_recipe_fails_before_planning(source: Path, tmp_path: Path) -> None:
    routes = [{"min_score": 0.0, "max_score": 1.0, "recipes": ["rephrase_as_poem"]}]
    with pytest.raises(PromptError, match=r"grounding\.routes: no recipe 'rephrase_as_poem'"):
        plan(config(tmp_path / "out", source, grounding={"routes": routes}))


# -- nothing spent on bad sources ----------------------------------------------------------------


def test_bad_passages_are_filtered_before_they_are_planned(tmp_path: Path) -> None:
    question = ("Which statement binds the name on the left to the value of the expression on "
                "the right side when the interpreter executes an assignment")  # fmt: skip
    bench = tmp_path / "bench.jsonl"
    bench.write_text(json.dumps({"question": question}) + "\n")
    good = TOPICS["assignment"][:3000]
    french = " ".join(
        [
            "Le chat dort sur le canapé pendant que la pluie tombe doucement sur"
            " les toits de la ville, et les enfants lisent des histoires."
        ]
        * 12
    )
    junk = "\n".join(f"x{i} = {i} * {i}" for i in range(120))
    records = [
        {"id": "good", "text": good},
        {"id": "contaminated", "text": TOPICS["class"][:2500] + "\n\n" + question + "."},
        {"id": "french", "text": french},
        {"id": "junk", "text": junk},
    ]
    src = tmp_path / "mixed.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    cfg = config(tmp_path / "out", src, plan={"limit": None},
                 grounding={"max_tokens": 2000, "min_tokens": 32},
                 filters={"decontam": {"benchmarks": [f"quiz={bench}"]}})  # fmt: skip
    requests, mixed = plan(cfg)
    assert {r.source_id for r in requests} == {"good"}
    rejected = mixed.account()["mixed.jsonl"]["rejected"]
    assert rejected.get("contaminated:quiz") == 1
    assert rejected.get("lang:fr") == 1
    assert sum(rejected.values()) == 3  # the junk too (its reason is the chain's first word)
    assert all(question not in r.prompt for r in requests)


def test_a_source_the_filters_thin_out_still_gives_its_share(tmp_path: Path) -> None:
    """Half the records are French: the first candidates leave the run short, and further
    rounds over the next smallest draws make it up."""
    french = " ".join(
        [
            "Le chat dort sur le canapé pendant que la pluie tombe doucement sur"
            " les toits de la ville, et les enfants lisent des histoires."
        ]
        * 8
    )
    src = write_source(tmp_path / "half.jsonl")
    with src.open("a", encoding="utf-8") as f:
        for i in range(150):
            f.write(json.dumps({"id": f"fr{i}", "text": f"{i}. {french}"}) + "\n")
    cfg = config(tmp_path / "out", src, plan={"limit": 20}, grounding={"oversample": 1.0})
    requests, mixed = plan(cfg)
    account = mixed.account()["half.jsonl"]
    assert len(requests) == 20 and account["planned"] == 20
    assert account["rejected"]["lang:fr"] > 0 and account["candidates"] > 20
    assert not any(r.source_id.startswith("fr") for r in requests if r.source_id)


# -- topics and sources in one plan --------------------------------------------------------------


def test_topics_and_sources_mix_by_their_shares(source: Path, tmp_path: Path) -> None:
    from booksmith.generation.seeds import load_seeds

    cfg = config(tmp_path / "out", source, plan={"limit": 40},
                 grounding={"topics_share": 1.0})  # fmt: skip
    cfg.sources[0].share = 3.0
    assert cfg.topics is None and not cfg.plans_topics  # sources alone: no topics
    requests, _ = plan(cfg)
    assert len(requests) == 40 and all(r.source_id for r in requests)
    mixed_cfg = cfg.model_copy(update={"topics": Path("topics.yaml")})
    assert mixed_cfg.plans_topics
    requests, _ = plan(mixed_cfg, load_seeds(None))
    grounded = [r for r in requests if r.source_id]
    assert len(grounded) == 30 and len(requests) == 40
    # interleaved: every stretch of eight requests holds both kinds
    for k in range(0, 40, 8):
        window = requests[k : k + 8]
        assert any(r.source_id for r in window) and any(not r.source_id for r in window)
    thirds = split_by_shares(10, [1.0, 1.0, 1.0])
    assert sum(n or 0 for n in thirds) == 10 and set(thirds) == {3, 4}
    assert split_by_shares(None, [1.0, 2.0]) == [None, None]


def test_sources_from_the_command_line_replace_the_configs(source: Path, tmp_path: Path) -> None:
    from booksmith.flows.nightly import resolve_config

    cfg = resolve_config(None, None, str(tmp_path), None, None, [str(source)])
    assert [s.path for s in cfg.sources] == [str(source)] and not cfg.plans_topics
    cfg = resolve_config(None, "t.yaml", str(tmp_path), None, None, [str(source)])
    assert cfg.plans_topics
    yaml_cfg = tmp_path / "c.yaml"
    yaml_cfg.write_text("sources:\n  - path: a.jsonl\n    shar: 2\n")
    with pytest.raises(ValueError, match=r"c\.yaml:3: sources\.0\.shar: unknown key"):
        load_config(yaml_cfg)


# -- provenance on the card, and older shards ----------------------------------------------------


def test_restrictive_licences_reach_the_card_and_mixed_ones_are_listed() -> None:
    def manifest(licenses: dict[str, dict[str, int]]) -> Manifest:
        sources = {name: {"path": name, "checksum": "c" * 64, "requests": 5, "planned": 5,
                          "licenses": lic} for name, lic in licenses.items()}  # fmt: skip
        counts = Counts(plan=PlanCounts(requests=10, sources=sources))
        return Manifest(run_id="r", shards=[], counts=counts, card={"license": "other"})

    assert front_matter(manifest({"a": {"PSF-2.0": 5}}))["license"] == "other"
    meta = front_matter(manifest({"wiki": {"CC-BY-SA-4.0": 5}, "docs": {"PSF-2.0": 5}}))
    assert meta["license"] == "CC-BY-SA-4.0"
    assert [s["licenses"] for s in meta["sources"]] == [["CC-BY-SA-4.0"], ["PSF-2.0"]]
    assert [s["share"] for s in meta["sources"]] == [0.5, 0.5]
    meta = front_matter(manifest({"a": {"CC-BY-NC-4.0": 2, "CC-BY-SA-3.0": 3}}))
    assert meta["license"] == ["CC-BY-NC-4.0", "CC-BY-SA-3.0"]
    assert card_license("mit", [{"licenses": ["CC-BY-SA-4.0"]}]) == ["mit", "CC-BY-SA-4.0"]


def test_shards_written_before_the_grounding_columns_still_read() -> None:
    old = versioned_schema(Document, 1)
    assert SCHEMA_VERSION == 2 and not set(GROUNDING_COLUMNS) & set(old.names)
    assert versioned_schema(Document, 2) == arrow_schema(Document)
    table = old.empty_table()
    read = conform(table, arrow_schema(Document))
    assert read.schema == arrow_schema(Document)
    # verify holds a version's shards to the schema its manifest's schema_version names
    from booksmith.schemas.manifest import ShardEntry
    from booksmith.shards.verify import _expected_schema

    shard = ShardEntry(path="text/part-00000.parquet", rows=0, bytes=0, sha256="", kind="text")
    v1 = Manifest(run_id="r", shards=[shard], schema_version=1)
    assert _expected_schema(shard, v1) == old
    v2 = Manifest(run_id="r", shards=[shard], schema_version=2)
    assert _expected_schema(shard, v2) == arrow_schema(Document)
    # a current request's grounding columns are all null for a topic request
    assert all(GenerationRequest.model_fields[c].default is None for c in GROUNDING_COLUMNS)


# -- the command line ----------------------------------------------------------------------------


def test_booksmith_plan_and_run_take_sources(source: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from booksmith.flows.cli import app

    runner = CliRunner()
    written = tmp_path / "plan.parquet"
    result = runner.invoke(app, ["plan", "--sources", str(source), "--out", str(tmp_path / "o"),
                                 "--limit", "6", "--seed", "3", "-o", str(written)])  # fmt: skip
    assert result.exit_code == 0, result.output
    rows = pa.parquet.read_table(written).to_pylist()
    assert len(rows) == 6 and all(r["source_id"] and r["recipe"] for r in rows)
    missing = tmp_path / "gone.jsonl"
    result = runner.invoke(app, ["run", "--sources", str(missing), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "gone.jsonl: source not found (sources[].path)" in lines[0]


def test_a_source_in_s3_streams_like_a_local_one(source: Path, bucket: str) -> None:
    """A real S3 protocol server (moto): the records, and so the checksum, a local copy has."""
    import boto3

    boto3.client("s3").upload_file(str(source), bucket, "corpora/pydoc.jsonl")
    remote = Source(SourceSpec(path=f"s3://{bucket}/corpora/"))
    assert remote.name == "corpora" and remote.files() == [f"{bucket}/corpora/pydoc.jsonl"]
    local = [r for b in Source(SourceSpec(path=str(source))).batches() for r in b]
    assert [r for b in remote.batches() for r in b] == local
