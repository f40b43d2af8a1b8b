"""The nightly flow re-annotates and retrains the quality classifier on the schedule in the
config, with a separate judge endpoint; the next night filters with the new model."""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from shards.version import read_manifest
from tests.conftest import fake_backend_config
from tests.fakeserver import FakeServer


class _HashJudge(BaseHTTPRequestHandler):
    """A judge whose score is a pure function of the extract (so the run is reproducible);
    it only has to give both classes: this test is about the schedule, not the learning."""

    calls = 0

    def do_POST(self) -> None:
        type(self).calls += 1
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        extract = body["messages"][-1]["content"].split("<extract>\n", 1)[-1]
        score = 4 if hashlib.sha256(extract.encode()).digest()[0] % 2 else 1
        data = json.dumps(
            {
                "id": "j", "object": "chat.completion", "created": 1, "model": body["model"],
                "choices": [{"index": 0, "finish_reason": "stop", "message": {
                    "role": "assistant", "content": f"Educational score: {score}"}}],
                "usage": {"prompt_tokens": 50, "completion_tokens": 5, "total_tokens": 55},
            }
        ).encode()  # fmt: skip
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def judge() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _HashJudge)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()


def test_retrain_on_schedule_then_filter_with_the_new_model(
    prefect_api: str, judge: str, tmp_path: Path, write_config
) -> None:
    from flows.nightly import nightly

    out = tmp_path / "out"
    with FakeServer() as generator:
        cfg = fake_backend_config(generator.base_url, out)
        cfg["plan"]["limit"] = 24
        cfg["filters"] = {
            "quality": {"retrain_every_days": 1, "threshold": 0.0},
            "annotate": {"base_url": judge, "model": "judge-model", "sample": 24},
        }
        first = Path(nightly(config=str(write_config(cfg))))
        model = out / "_state" / "quality" / "model.bin"
        assert model.is_file()
        card = json.loads(model.with_name("model.card.json").read_text())
        assert card["judge"] == "judge-model"
        annotations = pq.read_table(out / "_state" / "quality" / "annotations.parquet")
        assert annotations.num_rows == read_manifest(first)["documents"] == _HashJudge.calls
        # the first night had no model yet
        assert pq.read_table(first / "text", columns=["quality_score"])[0].null_count > 0

        cfg["seed"] = 8
        second = Path(nightly(config=str(write_config(cfg, "night2.yaml"))))
    scores = pq.read_table(second / "text", columns=["quality_score"])[0].to_pylist()
    assert scores and all(s is not None and 0 <= s <= 1 for s in scores)
    assert "quality" in read_manifest(second)["counts"]["filter"]
    # retrained one day ago at most: not due again, so the judge was not asked again
    assert _HashJudge.calls == annotations.num_rows
