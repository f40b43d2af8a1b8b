"""Streaming runs: the same dataset whatever the chunk size, worker count and runner (the quality
chain in process, on a local process pool or on Dask workers), near-duplicate clusters decided
across chunks (best quality score kept), each chunk's stages equal to the in-memory engine."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest

from booksmith.filters.dedup import DedupSettings, find_duplicates
from booksmith.filters.dedup.candidates import CandidateStore
from booksmith.filters.dedup.minhash import signatures
from booksmith.filters.dedup.normalize import exact_key, words
from booksmith.filters.quality import train
from booksmith.filters.records_io import read_labelled
from booksmith.generation.process import GenerationCall, GenerationProcess
from booksmith.pipeline import stages
from booksmith.pipeline.first_ids import FirstIds
from booksmith.pipeline.stages import ExactStage
from booksmith.schemas.filter_settings import QualitySettings
from booksmith.shards.version_dir import read_manifest, state_dir
from tests.conftest import fake_backend_config
from tests.fakeserver import FakeServer, completion_text
from tests.filters_helpers import LABELLED, make_doc

# -- the stages against the in-memory engine (quick) ---------------------------------------------


def _corpus(n: int, seed: int) -> list[str]:
    """Documents with exact and near duplicates scattered over the stream."""
    rng = random.Random(seed)
    bases = [completion_text(f"{i:064x}", 120) for i in range(n // 3)]
    texts = []
    for _ in range(n):
        base = rng.choice(bases).split()
        kind = rng.random()
        if kind < 0.3:  # near duplicate: two words replaced
            for _ in range(2):
                base[rng.randrange(len(base))] = "zebra"
        elif kind < 0.4:  # exact duplicate after normalisation
            base[0] = base[0].upper()
        texts.append(
            " ".join(base) if kind < 0.9 else completion_text(f"{rng.getrandbits(64):x}", 80)
        )
    return texts


@pytest.mark.parametrize("chunk", [1, 7, 1000])
def test_streamed_verdicts_equal_the_in_memory_engine(chunk: int, tmp_path: Path) -> None:
    texts = _corpus(150, seed=chunk)
    ids = [f"d{i:04d}" for i in range(len(texts))]
    scores = [random.Random(i).random() for i in range(len(texts))]
    settings = DedupSettings()
    # The engine's exact pass runs before any score is set in a nightly run: emulate that.
    exact_only = find_duplicates(ids, texts, None, DedupSettings(minhash=False))

    exact = ExactStage(FirstIds(tmp_path / "exact.bin"))
    store = CandidateStore(tmp_path / "c", settings.params)
    survivors: list[int] = []
    got: dict[str, tuple[str, str]] = {}
    for start in range(0, len(texts), chunk):
        rows = list(range(start, min(start + chunk, len(texts))))
        docs = [make_doc(texts[i], id=ids[i]) for i in rows]
        out = exact.run(docs)
        for r in out.rejected:
            got[r.id] = (r.reason, r.duplicate_of or "")
        kept_rows = [rows[k] for k, d in enumerate(docs) if d.id not in got]
        ws = [words(texts[i]) for i in kept_rows]
        sigs, has = signatures(ws, settings.params)
        store.append(
            [ids[i] for i in kept_rows], sigs, scores=[scores[i] for i in kept_rows],
            exact=np.array([exact_key(w) for w in ws], dtype=np.uint64),
            topics=[0] * len(kept_rows), tokens=[1] * len(kept_rows), chunk=start, has_sig=has,
        )  # fmt: skip
        survivors += kept_rows
    for dropped, keeper in store.resolve(settings.jaccard_threshold).items():
        got[ids[survivors[dropped]]] = ("dedup_minhash", ids[survivors[keeper]])

    want_exact = {ids[i]: (v.reason, v.duplicate_of) for i, v in enumerate(exact_only) if v}
    assert {k: v for k, v in got.items() if v[0] == "dedup_exact"} == want_exact
    # Near duplicates: the engine over the exact survivors, with their scores.
    left = [i for i in range(len(texts)) if ids[i] not in want_exact]
    near = find_duplicates(
        [ids[i] for i in left], [texts[i] for i in left], [scores[i] for i in left],
        DedupSettings(exact=False),
    )  # fmt: skip
    want_near = {ids[left[k]]: (v.reason, v.duplicate_of) for k, v in enumerate(near) if v}
    assert {k: v for k, v in got.items() if v[0] == "dedup_minhash"} == want_near
    assert len(want_near) > 10 and len(want_exact) > 5  # the corpus has both kinds


# -- whole runs ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server() -> Iterator[FakeServer]:
    faults = {
        "truncated": 0.08,
        "empty": 0.05,
        "bad_request": 0.05,
        "near_duplicate": 0.35,
        "near_duplicate_pool": 5,
    }
    with FakeServer(faults) as s:
        yield s


@pytest.fixture(scope="module")
def quality_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    data, _ = read_labelled(LABELLED)
    report = train(data, tmp_path_factory.mktemp("q"), QualitySettings(), judge="hand labels")
    return report.model_path


def _run(
    server: FakeServer,
    out: Path,
    write_config: Any,
    quality_model: Path,
    **plan: Any,
) -> Path:
    from booksmith.flows.nightly import nightly
    from booksmith.flows.task_runners import with_runner
    from booksmith.schemas.config import load_config

    cfg = fake_backend_config(server.base_url, out)
    cfg["plan"].update({"limit": 40, **plan})
    cfg["fill"] = {"documents": 48, "max_rounds": 3}  # a fill round or two
    # Threshold 0: every document is scored and kept by the classifier, so clusters are
    # decided by score.
    cfg["filters"] = {"quality": {"model_path": str(quality_model), "threshold": 0.0}}
    config = write_config(cfg, f"{out.name}.yaml")
    return Path(with_runner(nightly, load_config(config))(config=str(config)))


def _rows(version: Path, kind: str) -> list[dict[str, Any]]:
    rows = pq.read_table(version / kind).to_pylist()
    for row in rows:  # what differs between two runs of the same plan
        run_id = row.pop("run_id")
        row.pop("created_at")
        if row.get("detail") and '"matched_run"' in row["detail"]:
            row["detail"] = row["detail"].replace(run_id, "<this run>")
    return rows


@pytest.mark.slow
def test_same_dataset_whatever_the_chunk_size_and_workers(
    prefect_api: str,
    server: FakeServer,
    quality_model: Path,
    tmp_path: Path,
    write_config: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    generated: list[int] = []  # requests per call of the run's generation process
    in_process = GenerationProcess.run

    def counting(self: GenerationProcess, call: GenerationCall) -> Any:
        generated.append(len(call.plan))
        return in_process(self, call)

    monkeypatch.setattr(GenerationProcess, "run", counting)
    whole = _run(server, tmp_path / "whole", write_config, quality_model, chunk_requests=1000)
    small = _run(server, tmp_path / "small", write_config, quality_model, chunk_requests=7)
    monkeypatch.setattr(stages, "POOL_MIN_DOCS", 1)  # even 13-request chunks go to the pool
    pooled = _run(server, tmp_path / "pool", write_config, quality_model, chunk_requests=13)
    # The Dask runner's dataset is compared in test_scaleout (CLI runs) and its quality slices
    # in test_dask_filtering: a Dask run inside this process hung once in CI (a worker stuck
    # starting a Prefect task; see the session note), so it is not repeated here.
    manifests = [read_manifest(v) for v in (whole, small, pooled)]
    # every chunk was generated in the runs' generation processes, one call per chunk
    chunks = [m.counts.chunks.count for m in manifests]
    assert len(generated) == sum(chunks)
    assert sum(generated) == sum(m.counts.generate.planned for m in manifests)
    assert chunks[0] == len(manifests[0].counts.fill.rounds) < chunks[2] < chunks[1]
    assert len(manifests[0].counts.fill.rounds) >= 2  # fill rounds were chunked too
    for kind in ("text", "rejected"):
        a = _rows(whole, kind)
        assert a == _rows(small, kind) == _rows(pooled, kind), kind
    assert (
        pq.read_table(whole / "plan.parquet").column("id").to_pylist()
        == pq.read_table(small / "plan.parquet").column("id").to_pylist()
    )
    for m in manifests[1:]:
        assert m.counts.filter == manifests[0].counts.filter
        assert m.diversity == manifests[0].diversity
        assert m.quality == manifests[0].quality
    assert not (state_dir(tmp_path / "small") / "runs" / small.name).exists()  # spills removed

    # Rejects of every kind exist, and near-duplicates were decided across chunks.
    rejected = _rows(small, "rejected")
    reasons = {r["reason"].split(":")[0] for r in rejected}
    assert {"dedup_minhash", "truncated", "empty"} <= reasons, reasons
    position = {
        i: k for k, i in enumerate(pq.read_table(small / "plan.parquet").column("id").to_pylist())
    }
    score = {r["id"]: r["quality_score"] for r in _rows(small, "text") + rejected}
    near = [r for r in rejected if r["reason"] == "dedup_minhash"]
    across = [r for r in near if position[r["id"]] // 7 != position[r["duplicate_of"]] // 7]
    assert len(across) >= 3, "no near-duplicate matched a document of another chunk"
    later_keeper = [r for r in across if position[r["duplicate_of"]] > position[r["id"]]]
    assert later_keeper, "no cluster kept a document from a later chunk"
    for r in near:  # every cluster kept its best-scored member
        assert score[r["duplicate_of"]] >= score[r["id"]]
    # Each duplicate names the run that holds its match and their estimated Jaccard.
    threshold = DedupSettings.model_validate(read_manifest(small).config["dedup"]).jaccard_threshold
    for r in (r for r in rejected if r["reason"].startswith("dedup_")):
        evidence = json.loads(r["detail"])
        assert evidence["matched_run"] == "<this run>", r
        assert threshold <= evidence["jaccard"] <= 1.0, r
