"""End to end on the real embedded model: llama.cpp serving SmolLM2-135M, started by booksmith,
driven by the real CLI against a real Prefect server. Small max_tokens keep it quick."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from booksmith.generation.seeds import load_seeds
from booksmith.shards.version_dir import list_versions, read_manifest

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def booksmith(*args: str, api: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PREFECT_API_URL": api}
    return subprocess.run(
        [sys.executable, "-m", "booksmith", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_run_on_the_embedded_model(prefect_api: str, tmp_path: Path, write_config) -> None:
    out = tmp_path / "out"
    config = write_config(
        {
            "seed": 11,
            "plan": {"limit": 4},
            "generation": {"sampling": {"max_tokens": 32}},
            "fill": {"documents": None},
            "publish": {"min_documents": 0},  # 32-token answers may all be cut and rejected
        }
    )
    result = booksmith("run", "--config", str(config), "--out", str(out), api=prefect_api)
    assert result.returncode == 0, result.stderr[-3000:]
    (version,) = list_versions(out)
    assert result.stdout.strip() == str(version)
    manifest = read_manifest(version)
    gen = manifest.counts.generate
    assert gen.planned == 4 == gen.completed + gen.failed
    assert gen.completion_tokens > 0 and gen.failed == 0
    # 32 tokens make short, truncated texts: the default filters reject them, with reasons.
    kept = pq.read_table(version / "text").to_pylist()
    rejected = pq.read_table(version / "rejected").to_pylist()
    rows = kept + rejected
    assert len(rows) == 4 == manifest.documents + manifest.counts.rejected
    for row in rows:
        assert row["backend"] == "embedded" and row["model"]
        assert len(row["text"].split()) >= 5  # real generated words
        assert 0 < row["n_tokens"] <= 60
        assert row["finish_reason"] in ("stop", "length")
    assert any(r["finish_reason"] == "length" and r["truncated"] for r in rows)
    for row in rejected:
        assert row["reason"] in ("truncated:finish_length", "too_short:tokens"), row["reason"]


def test_topics_expand_on_the_embedded_model(
    prefect_api: str, tmp_path: Path, write_config
) -> None:
    """Real children on the embedded default (issue 17 point 4): each root, from different
    fields, keeps at least 2 children, none of them junk, a section label, a repeat of its
    parent or its parent's name dressed up, and no title under two parents."""
    from booksmith.generation.topics import affix_reason, junk_reason, normalise, similar

    config = write_config({"output": {"dir": str(tmp_path / "out")}})
    roots = ["Climate change", "Linear algebra", "Organic chemistry"]
    topics = tmp_path / "topics.jsonl"
    result = booksmith(
        "topics", "expand", *roots, "--depth", "1", "--breadth", "3", "--seed", "1",
        "-o", str(topics), "--config", str(config),
        api=prefect_api,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    seeds = load_seeds(topics)
    assert [s.topic for s in seeds[: len(roots)]] == roots
    children = {root: [s.topic for s in seeds if s.path == [root]] for root in roots}
    assert len(seeds) == len(roots) + sum(map(len, children.values()))
    for root, kids in children.items():
        assert 2 <= len(kids) <= 3, children
        for kid in kids:
            assert junk_reason(kid) is None and affix_reason(kid, [root]) is None, kid
            assert not similar(kid, root), kid
    titles = [normalise(t) for kids in children.values() for t in kids]
    assert len(titles) == len(set(titles)), children  # no repeats, no title under two parents
    # the report's per-root table
    assert "per root" in result.stderr
    for root, kids in children.items():
        assert any(root in line and f" {len(kids)} " in line for line in result.stderr.splitlines())

    # the tree is a topic file a run plans and generates from (issue 17's Done when)
    run_config = write_config(
        {
            "seed": 3,
            "topics": str(topics),
            "plan": {"limit": 4},
            "generation": {"sampling": {"max_tokens": 48}},
            "output": {"dir": str(tmp_path / "run")},
            "fill": {"documents": None},
            "publish": {"min_documents": 0},  # 48-token answers are cut short and rejected
        },
        "run.yaml",
    )
    ran = booksmith("run", "--config", str(run_config), api=prefect_api)
    assert ran.returncode == 0, ran.stderr[-3000:]
    (version,) = list_versions(tmp_path / "run")
    plan = pq.read_table(version / "plan.parquet", columns=["topic_path"])["topic_path"]
    planned = [tuple(p) for p in plan.to_pylist()]
    assert len(planned) == 4 and set(planned) <= {tuple(s.topic_path) for s in seeds}
    assert any(len(p) == 2 for p in planned)  # children of the tree, not only its roots
    assert read_manifest(version).counts.generate.completed == 4
