"""The optional LLM faithfulness judge (filters/faithfulness_judge.py, pipeline/judge_stage.py):
runs of topics and sources on the fake server, judged by a scripted judge server
(tests/judge.py), whose "yes, unsupported" documents are rejected `grounding:judge` with the
answer in their detail and counted in the manifest; off by default (nothing asked); a judge
without structured output answered in plain text; an unparsable reply keeps its document; a
repeated run (another chunking) asks nothing and keeps the same documents; and the judge on the
run's own endpoint when no other is named."""

from __future__ import annotations

import hashlib
import json
import shutil
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from booksmith.filters.faithfulness_judge import parse_answer
from booksmith.prompts import _package_dir
from booksmith.schemas.config import ConfigError, load_config
from booksmith.shards.version_dir import read_manifest, state_dir
from tests.conftest import fake_backend_config
from tests.fakeserver import FakeServer
from tests.judge import faithfulness_server
from tests.test_grounded_plan import write_source

TOPICS = _package_dir() / "topics" / "default.yaml"


def judge_counts(manifest: Any) -> dict[str, int]:
    """The judge's verdicts (counts.filter: input, kept and reasons only, as every filter's)
    and its work (counts.judge) together."""
    verdicts = manifest.counts.filter["faithfulness_judge"]
    assert set(verdicts) <= {"input", "kept", "grounding:judge"}, verdicts
    return {**verdicts, **(manifest.counts.judge or {})}


def _bucket(text: str) -> int:
    return int(hashlib.sha256(text.encode()).hexdigest()[:2], 16) % 3


def scripted(text: str) -> str:
    """A third of the documents unsupported, the rest faithful (fixed by their text)."""
    return "yes" if _bucket(text) == 0 else "no"


def _run(
    server: FakeServer, out: Path, write_config: Any, tmp_path: Path, judge: dict[str, Any],
    **extra: Any,
) -> Path:  # fmt: skip
    from booksmith.flows.nightly import nightly
    from booksmith.flows.task_runners import with_runner

    source = tmp_path / "pydoc.jsonl"
    if not source.exists():
        write_source(source)
    data = fake_backend_config(server.base_url, out)
    data.update(
        seed=5, topics=str(TOPICS), sources=[{"path": str(source), "share": 3}],
        grounding={"topics_share": 1}, plan={"limit": 16},
        filters={"faithfulness": {"judge": judge}},
    )  # fmt: skip
    data.update(extra)
    config = write_config(data, f"{out.name}.yaml")
    return Path(with_runner(nightly, load_config(config))(config=str(config)))


def _rows(version: Path, kind: str) -> list[dict[str, Any]]:
    return pq.read_table(version / kind).to_pylist()


def _judged_out(version: Path) -> list[dict[str, Any]]:
    return [r for r in _rows(version, "rejected") if r["reason"] == "grounding:judge"]


@pytest.mark.slow
def test_the_judge_rejects_what_it_finds_unsupported_and_a_rerun_asks_nothing(
    prefect_api: str, tmp_path: Path, write_config: Any
) -> None:
    with FakeServer({}) as server, faithfulness_server(scripted) as (url, calls):
        # off by default: a judge endpoint configured but not enabled is never asked
        plain = _run(server, tmp_path / "off", write_config, tmp_path, {"base_url": url})
        assert calls[0] == 0
        assert "faithfulness_judge" not in read_manifest(plain).counts.filter

        on = {"enabled": True, "base_url": url, "model": "judge-model"}
        version = _run(server, tmp_path / "on", write_config, tmp_path, on)
        asked = calls[0]
        counts = judge_counts(read_manifest(version))
        # the rerun: another output directory holding this one's response cache, other chunks
        again_out = tmp_path / "again"
        state_dir(again_out).mkdir(parents=True)
        shutil.copy(state_dir(tmp_path / "on") / "responses.sqlite", state_dir(again_out))
        again = _run(server, again_out, write_config, tmp_path, on,
                     plan={"limit": 16, "chunk_requests": 3})  # fmt: skip
        assert calls[0] == asked, "the rerun asked the judge again"

    text = {r["id"]: r for r in _rows(version, "text")}
    dropped = _judged_out(version)
    assert dropped and text, "the scripted judge drops some documents and keeps others"
    for r in dropped:
        assert r["source_id"] and scripted(r["text"]) == "yes"
        detail = json.loads(r["detail"])
        assert detail["answer"] == "yes" and detail["judge"] == "judge-model"
        assert json.loads(detail["reply"]) == {"answer": "yes"}
    # kept: the faithful grounded documents, and the topic documents, never sent
    grounded_kept = [r for r in text.values() if r["source_id"]]
    assert grounded_kept and all(scripted(r["text"]) == "no" for r in grounded_kept)
    assert any(r["source_id"] is None for r in text.values())
    judged = counts["judged"]
    report = (version / "report" / "report.md").read_text()  # its work is not a drop there
    (row,) = [line for line in report.splitlines() if line.startswith("| faithfulness_judge |")]
    assert row.endswith(f"| grounding:judge: {counts['grounding:judge']} |"), row
    assert f"judge was asked about {judged} grounded documents" in report
    assert asked == judged == counts["requests"] > 0
    assert counts["grounding:judge"] == len(dropped)
    assert counts["input"] - counts["kept"] == len(dropped)
    assert counts["input"] > judged  # the topic documents passed untouched
    assert counts["unparsed"] == counts["failed"] == 0
    # the judge only took away what it rejected: the run without it kept these and those
    assert set(text) | {r["id"] for r in dropped} == {r["id"] for r in _rows(plain, "text")}
    # the rerun: the same documents kept and dropped, every answer from the cache
    assert {r["id"] for r in _rows(again, "text")} == set(text)
    assert {r["id"] for r in _judged_out(again)} == {r["id"] for r in dropped}
    again_counts = judge_counts(read_manifest(again))
    assert again_counts["requests"] == 0 and again_counts["judged"] == judged


@pytest.mark.slow
def test_one_judge_client_and_response_cache_serve_every_chunk_of_a_run(
    prefect_api: str, tmp_path: Path, write_config: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The judge's client is built (and its response cache opened) once per run, on the first
    chunk, and closed with the run: counted on the factory over a run of several chunks that
    each ask the judge."""
    from booksmith.generation import clients
    from booksmith.pipeline.judge_stage import JudgeStage

    caches: list[Any] = []  # the response cache of each judge client built
    make_client, judge_run = clients.make_client, JudgeStage.run

    def counting_make_client(cfg: Any, endpoint: Any, **kwargs: Any) -> Any:
        if endpoint.model == "judge-model":  # not the generation's clients
            caches.append(kwargs["cache"])
        return make_client(cfg, endpoint, **kwargs)

    asked: list[int] = []  # requests the judge server got during each chunk

    def counting_run(self: JudgeStage, docs: Any, counts: Any) -> Any:
        before = calls[0]
        out = judge_run(self, docs, counts)
        asked.append(calls[0] - before)
        return out

    monkeypatch.setattr(clients, "make_client", counting_make_client)
    monkeypatch.setattr(JudgeStage, "run", counting_run)
    with FakeServer({}) as server, faithfulness_server(scripted) as (url, calls):
        on = {"enabled": True, "base_url": url, "model": "judge-model"}
        version = _run(server, tmp_path / "on", write_config, tmp_path, on,
                       plan={"limit": 16, "chunk_requests": 4})  # fmt: skip
    assert len(asked) == 4 and sum(n > 0 for n in asked) >= 2, asked
    assert len(caches) == 1, "the judge's client was built more than once in the run"
    with pytest.raises(sqlite3.ProgrammingError):  # closed when the run ended
        len(caches[0])
    assert judge_counts(read_manifest(version))["requests"] == calls[0] == sum(asked)


@pytest.mark.slow
def test_a_judge_without_structured_output_is_read_from_its_plain_answer(
    prefect_api: str, tmp_path: Path, write_config: Any
) -> None:
    def answer(text: str) -> str:  # a third unsupported, a third that say neither
        return ("yes", "I cannot tell from this alone.", "no")[_bucket(text)]

    with (
        FakeServer({}) as server,
        faithfulness_server(answer, structured_output=False) as (url, calls),
    ):
        version = _run(server, tmp_path / "out", write_config, tmp_path,
                       {"enabled": True, "base_url": url})  # fmt: skip
    counts = judge_counts(read_manifest(version))
    dropped = _judged_out(version)
    text = _rows(version, "text")
    assert dropped and all(answer(r["text"]) == "yes" for r in dropped)
    for r in dropped:
        detail = json.loads(r["detail"])
        assert detail["answer"] == "yes" and detail["reply"].startswith("Yes, it names")
    unsure = [r for r in text if r["source_id"] and answer(r["text"]).startswith("I cannot")]
    assert unsure, "an unparsable answer keeps its document"
    assert counts["unparsed"] == len(unsure) and counts["grounding:judge"] == len(dropped)
    # each document asked twice: with response_format (refused), then in plain text
    assert calls[0] == 2 * counts["judged"] == counts["requests"]


@pytest.mark.slow
def test_the_judge_asks_the_runs_own_endpoint_when_none_is_named(
    prefect_api: str, tmp_path: Path, write_config: Any
) -> None:
    with FakeServer({"structured_output": True}) as server:
        version = _run(server, tmp_path / "out", write_config, tmp_path, {"enabled": True})
        stats = server.stats()
    manifest = read_manifest(version)
    counts = judge_counts(manifest)
    # the fake server answers the schema's enum: every grounded document judged and parsed
    assert counts["judged"] > 0 and counts["unparsed"] == counts["failed"] == 0
    assert stats["requests"] == manifest.counts.generate.requests + counts["requests"]
    for r in _judged_out(version):
        assert json.loads(r["detail"])["judge"] == "fake-model"


@pytest.mark.parametrize(
    ("reply", "answer"),
    [
        ('{"answer": "yes"}', "yes"),
        ('{"answer": "No"}', "no"),
        ("No. Everything it states is in the passage.", "no"),
        ("Yes - the year 1887 is not in it.", "yes"),
        ("The document is mostly faithful; no, nothing is added.", "no"),
        ("I cannot tell.", None),
        ("Yesterday it said nothing else", None),
        ('{"answer": "maybe"}', None),
    ],
)
def test_the_answer_is_the_structured_one_or_the_first_yes_or_no_word(
    reply: str, answer: str | None
) -> None:
    assert parse_answer(reply) == answer


def test_a_judge_key_without_its_endpoint_is_one_line_naming_it(
    tmp_path: Path, write_config: Callable[..., Path]
) -> None:
    judge = {"enabled": True, "api_key_env": "JUDGE_KEY"}
    config = write_config({"filters": {"faithfulness": {"judge": judge}}})
    with pytest.raises(ConfigError) as err:
        load_config(config)
    message = str(err.value)
    assert "filters.faithfulness.judge" in message and "set base_url too" in message
    assert "\n" not in message


@pytest.mark.e2e
@pytest.mark.slow
def test_the_stage_on_the_embedded_default_endpoint(tmp_path: Path) -> None:
    """The default config's own endpoint (the embedded model): the schema compiles to its
    grammar, so each grounded document gets a parsed yes or no; a topic document is not sent;
    the second pass is answered by the cache."""
    from booksmith.generation.backends import open_endpoint
    from booksmith.pipeline.judge_stage import JudgeStage
    from booksmith.schemas.config import RunConfig
    from tests.filters_helpers import make_doc
    from tests.test_faithfulness import PASSAGE, faithful, grounded

    cfg = RunConfig.model_validate(
        {"output": {"dir": str(tmp_path)}, "embedded": {"n_parallel": 2},
         "filters": {"faithfulness": {"judge": {"enabled": True}}}}
    )  # fmt: skip
    invented = "In 1887 Dr. Smith of Vienna proved that every exception is a comet. " * 8
    made = [grounded(faithful(PASSAGE)), grounded(invented), make_doc("A topic document. " * 20)]
    docs = [d.model_copy(update={"id": f"doc-{k}"}) for k, d in enumerate(made)]
    stage = JudgeStage(cfg.filters.faithfulness.judge, "e2e")
    counts: dict[str, dict[str, int]] = {}
    with open_endpoint(cfg.generation, cfg.embedded) as endpoint:
        stage.bind(cfg, [endpoint])
        first = stage.run(docs, counts)
        once = dict(counts["faithfulness_judge"])
        second = stage.run(docs, counts)
    assert once["judged"] == 2 and once["unparsed"] == once["failed"] == 0
    assert once["requests"] >= 2 and once["input"] == 3
    assert docs[2] in first.kept  # the topic document, untouched
    assert [d.id for d in second.kept] == [d.id for d in first.kept]
    assert counts["faithfulness_judge"]["requests"] == once["requests"]  # all from the cache
