"""After a takedown, a later run that generates the same text again (another request, another
seed) does not bring it back: a text that matches the taken-down document's flagged index entry
is rejected as `dedup_taken_down` and written without its text."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from tests.conftest import fake_backend_config
from tests.fakeserver import FakeServer

pytestmark = pytest.mark.slow


def _run(server: FakeServer, out: Path, seed: int, tmp: Path) -> Path:
    from booksmith.flows.nightly import nightly
    from booksmith.flows.task_runners import with_runner
    from booksmith.schemas.config import load_config

    cfg = fake_backend_config(server.base_url, out)
    cfg["seed"] = seed
    cfg["plan"] = {"limit": 30}
    path = tmp / f"config-{seed}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return Path(with_runner(nightly, load_config(path))(config=str(path)))


def test_a_taken_down_text_generated_again_is_kept_out_without_its_text(
    prefect_api: str, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    faults = {"near_duplicate": 0.6, "near_duplicate_pool": 2}  # most answers: two families
    with FakeServer(faults) as server:
        first = _run(server, out, 1, tmp_path)
        kept = {r["id"]: r for r in pq.read_table(first / "text").to_pylist()}
        family = Counter(r["duplicate_of"] for r in pq.read_table(first / "rejected").to_pylist())
        target = kept[family.most_common(1)[0][0]]  # the kept one of a near-duplicate family
        gone = subprocess.run(
            [sys.executable, "-m", "booksmith", "datasets", "takedown", str(out), target["id"],
             "--yes"],
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert gone.returncode == 0, gone.stderr
        second = _run(server, out, 2, tmp_path)

    rows = [*pq.read_table(second / "text").to_pylist(),
            *pq.read_table(second / "rejected").to_pylist()]  # fmt: skip
    blocked = [r for r in rows if r.get("reason") == "dedup_taken_down"]
    assert blocked, "no answer of the second run matched the taken-down document"
    for r in blocked:
        assert r["text"] == "" and r["duplicate_of"] == target["id"]
        assert json.loads(r["detail"])["text_removed"]
    # Whatever dedup matched to the taken-down document kept no text (LSH finds a near copy
    # with high probability, not certainty: a copy it misses is a new document, as any is).
    assert all(r["text"] == "" for r in rows if r.get("duplicate_of") == target["id"])
