"""Runs that fill a target: plan again for what the filters rejected, within the budget, and
stop with an account when the target, the budget or the round ceiling is reached."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from booksmith.shards.version_dir import read_manifest
from tests.conftest import fake_backend_config
from tests.fakeserver import FakeServer


@pytest.fixture(scope="module")
def lossy() -> Iterator[FakeServer]:
    # A third of the completions come back empty: the filters reject them.
    with FakeServer({"empty": 0.34}) as s:
        yield s


def run(config: Path) -> Path:
    from booksmith.flows.nightly import nightly

    return Path(nightly(config=str(config)))


def _ids(version: Path, part: str) -> list[str]:
    return pq.read_table(version / part, columns=["id"]).column("id").to_pylist()


def test_fill_a_document_target_per_topic(
    prefect_api: str, lossy: FakeServer, tmp_path: Path, write_config
) -> None:
    topics = tmp_path / "topics.csv"
    topics.write_text("topic,subject\nFractions,Mathematics\nVolcanoes,Geology\nHaiku,Arts\n")
    cfg = fake_backend_config(lossy.base_url, tmp_path / "out")
    cfg["topics"] = str(topics)
    cfg["plan"] = {"limit": None}  # one request per topic to start with
    cfg["fill"] = {"documents_per_topic": 2, "max_rounds": 6}
    version = run(write_config(cfg))
    manifest = read_manifest(version)
    fill = manifest.counts.fill
    assert fill.stopped == "target_met" and fill.short == {}, fill
    assert len(fill.rounds) > 1  # the empties had to be made up for
    kept = pq.read_table(version / "text", columns=["topic"]).column("topic").to_pylist()
    per_topic = Counter(kept)
    assert set(per_topic) == {"Fractions", "Volcanoes", "Haiku"}
    assert min(per_topic.values()) >= 2
    # every request of every round is in the plan once, and ends kept, rejected or failed
    plan = _ids(version, "plan.parquet")
    assert len(plan) == len(set(plan)) == sum(r.planned for r in fill.rounds)
    gen = manifest.counts.generate
    assert gen.planned == len(plan) == gen.completed + gen.failed
    rejected = _ids(version, "rejected")
    assert len(plan) == manifest.documents + len(rejected) + gen.failed


def test_fill_stops_at_the_budget_with_an_account(
    prefect_api: str, lossy: FakeServer, tmp_path: Path, write_config
) -> None:
    cfg = fake_backend_config(lossy.base_url, tmp_path / "out")
    cfg["plan"] = {"limit": 4}
    cfg["fill"] = {"documents": 40, "max_rounds": 10}
    # about 8 requests' worth of tokens: far short of 40 documents
    cfg["generation"]["budget"] = {"max_tokens": 8 * 600}
    version = run(write_config(cfg))
    manifest = read_manifest(version)
    fill, gen = manifest.counts.fill, manifest.counts.generate
    assert fill.stopped == "budget_exhausted"
    assert fill.short["*"] == 40 - manifest.documents > 0
    assert gen.skipped_budget > 0
    assert gen.prompt_tokens + gen.completion_tokens <= 8 * 600


def test_the_budget_holds_across_the_chunks_of_a_round(
    prefect_api: str, lossy: FakeServer, tmp_path: Path, write_config
) -> None:
    # Each chunk starts with what the earlier ones left, the one just generated included,
    # though its filtering has not started when the next chunk's generation does.
    cfg = fake_backend_config(lossy.base_url, tmp_path / "out")
    cfg["plan"] = {"limit": 24, "chunk_requests": 4}
    cfg["generation"]["budget"] = {"max_tokens": 10 * 600}
    manifest = read_manifest(run(write_config(cfg)))
    gen = manifest.counts.generate
    assert manifest.counts.chunks.count == 6
    assert gen.skipped_budget > 0 and gen.completed > 4  # it stopped in a later chunk
    assert gen.prompt_tokens + gen.completion_tokens <= 10 * 600


def test_fill_stops_when_a_round_keeps_nothing_new(
    prefect_api: str, tmp_path: Path, write_config
) -> None:
    # Nothing is ever kept: dividing the need by that keep rate would plan without end.
    with FakeServer({"empty": 1.0}) as nothing_useful:
        cfg = fake_backend_config(nothing_useful.base_url, tmp_path / "out")
        cfg["plan"] = {"limit": 3}
        cfg["fill"] = {"tokens": 10_000, "max_rounds": 3}
        cfg["publish"] = {"min_documents": 0}  # publish the empty run, to read its fill account
        version = run(write_config(cfg))
    manifest = read_manifest(version)
    fill = manifest.counts.fill
    assert fill is not None and fill.stopped == "no_progress" and len(fill.rounds) == 1
    assert manifest.counts.generate.planned == 3
    assert manifest.documents == 0 and fill.short["*"] > 0


def test_fill_stops_at_the_round_ceiling(
    prefect_api: str, lossy: FakeServer, tmp_path: Path, write_config
) -> None:
    cfg = fake_backend_config(lossy.base_url, tmp_path / "out")
    cfg["plan"] = {"limit": 10}
    cfg["fill"] = {"documents": 100, "max_rounds": 2, "max_requests": 20}
    fill = read_manifest(run(write_config(cfg))).counts.fill
    assert fill is not None and fill.stopped == "max_rounds", fill
    assert [r.planned for r in fill.rounds] == [10, 10]


def test_fill_never_plans_past_the_request_cap(
    prefect_api: str, lossy: FakeServer, tmp_path: Path, write_config
) -> None:
    cfg = fake_backend_config(lossy.base_url, tmp_path / "out")
    cfg["plan"] = {"limit": 4}
    cfg["fill"] = {"documents": 1_000, "max_rounds": 10, "max_requests": 16}
    manifest = read_manifest(run(write_config(cfg)))
    fill = manifest.counts.fill
    assert fill is not None and fill.stopped == "max_requests"
    assert manifest.counts.generate.planned == 16 == sum(r.planned for r in fill.rounds)


def test_fill_rounds_keep_the_subjects_balanced(
    prefect_api: str, tmp_path: Path, write_config
) -> None:
    """The bundled seeds (9 subjects, Mathematics first), a first round of 3 per subject, and
    a server that cuts most Chemistry answers short (rejected by the filters): the fill
    rounds ask Chemistry for more, not the first subject of the file, and the kept set ends
    with every subject within max(1, 20%) of an equal share."""
    faults = {"prompt_faults": {"part of Chemistry": {"truncated": 0.7}}}
    with FakeServer(faults) as server:
        cfg = fake_backend_config(server.base_url, tmp_path / "out")
        cfg["plan"] = {"limit": 27}
        cfg["fill"] = {"documents": 27, "max_rounds": 4}
        version = run(write_config(cfg))
    kept = Counter(pq.read_table(version / "text", columns=["subject"])["subject"].to_pylist())
    plan = pq.read_table(version / "plan.parquet", columns=["subject"])["subject"].to_pylist()
    assert len(kept) == 9, kept
    share = sum(kept.values()) / 9
    assert all(abs(n - share) <= max(1, 0.2 * share) for n in kept.values()), (share, kept)
    planned = Counter(plan)
    # the plan deviates to compensate: Chemistry was asked most, Mathematics no more than most
    assert planned.most_common(1)[0][0] == "Chemistry", planned
    assert planned["Mathematics"] <= sorted(planned.values())[len(planned) // 2] + 1, planned
    # the report shows both, per subject (table and plot) and per topic
    report = (version / "report" / "report.md").read_text()
    assert f"| Chemistry | {planned['Chemistry']} | {kept['Chemistry']} |" in report
    assert (version / "report" / "balance.png").stat().st_size > 0
    topics = Counter(
        pq.read_table(version / "plan.parquet", columns=["topic"])["topic"].to_pylist()
    )
    topic, n = topics.most_common(1)[0]
    assert f"| {topic} | {n} |" in report


def test_the_adaptive_limits_carry_from_chunk_to_chunk(
    prefect_api: str, tmp_path: Path, write_config, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Most first attempts draw a 429: the first chunk's client brings its limits down, and
    # every later chunk's client starts where the chunk before left them, not from the config.
    import booksmith.flows.nightly as nightly_module

    calls: list[Any] = []
    real = nightly_module.GenerationCall

    def spy(*args: Any, **kwargs: Any) -> Any:
        calls.append(real(*args, **kwargs))
        return calls[-1]

    monkeypatch.setattr(nightly_module, "GenerationCall", spy)
    with FakeServer({"rate_limit": 0.6, "retry_after_s": 0.05}) as limited:
        cfg = fake_backend_config(limited.base_url, tmp_path / "out")
        cfg["plan"] = {"limit": 30, "chunk_requests": 10}
        manifest = read_manifest(run(write_config(cfg)))
    assert manifest.counts.chunks.count == 3 == len(calls)
    assert manifest.counts.generate.rate_limited > 0
    assert calls[0].limits == {}  # the run's first chunk starts from the settings
    for call in calls[1:]:
        (state,) = call.limits.values()
        assert state["rate"] is not None  # a limit learned in an earlier chunk
        assert state["concurrency"] < cfg["generation"]["max_concurrency"]
