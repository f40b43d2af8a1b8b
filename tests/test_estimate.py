"""What a run will cost, said before it runs: tokens counted from the plan's own prompts,
completion length from earlier runs, dollars from generation.prices, and a budget that warns
or refuses before the first request (generation/estimate.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from booksmith.generation import estimate as est_module
from booksmith.generation.estimate import MESSAGE_OVERHEAD, estimate
from booksmith.generation.plan import plan_for
from booksmith.generation.seeds import load_seeds
from booksmith.schemas.config import RunConfig
from booksmith.shards.encodings import get_encoding
from booksmith.shards.version_dir import list_versions, read_manifest
from tests.conftest import fake_backend_config
from tests.fakeserver import FakeServer

BOOKSMITH = [sys.executable, "-m", "booksmith"]
PRICES = {"fake-model": {"prompt_per_million": 2.0, "completion_per_million": 10.0}}


def _plan(cfg: RunConfig) -> tuple[list, int]:
    seeds = load_seeds(cfg.topics)
    requests = list(plan_for(cfg, seeds, 7, samples_per_topic=cfg.plan.samples_per_topic,
                             limit=cfg.plan.limit))  # fmt: skip
    return requests, len(seeds)


def test_tokens_and_dollars_of_a_plan(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = RunConfig.model_validate(
        {**fake_backend_config("http://127.0.0.1:9/v1", tmp_path / "out", prices=PRICES),
         "plan": {"limit": 60}}
    )  # fmt: skip
    requests, topics = _plan(cfg)
    enc = get_encoding(cfg.output.encoding)
    exact = sum(
        len(enc.encode_ordinary(m.content)) + MESSAGE_OVERHEAD for r in requests for m in r.messages
    )
    est = estimate(iter(requests), cfg, topics)
    assert (est.requests, est.prompt_tokens) == (60, exact)  # small plans: exact
    assert est.completion_tokens_max == est.completion_tokens_expected == 60 * 256
    assert est.cost_max == pytest.approx((exact * 2.0 + 60 * 256 * 10.0) / 1e6)
    assert "no earlier run" in est.basis and "$" in est.line()

    # a plan larger than the exact sample: the first 10 prompts tokenized, the rest scaled by
    # their characters, within 3%
    monkeypatch.setattr(est_module, "EXACT_PROMPTS", 10)
    counted: list[str] = []

    class Spy:
        def encode_ordinary(self, text: str) -> list[int]:
            counted.append(text)
            return enc.encode_ordinary(text)

    monkeypatch.setattr(est_module, "get_encoding", lambda name: Spy())
    scaled = estimate(iter(requests), cfg, topics)
    assert len(counted) == 10 and abs(scaled.prompt_tokens / exact - 1) < 0.03

    unpriced = RunConfig.model_validate(fake_backend_config("http://x/v1", tmp_path / "o"))
    assert estimate(iter(requests), unpriced, topics).cost_max is None


@pytest.mark.slow
def test_runs_say_what_they_will_cost_and_a_budget_can_refuse(
    prefect_api: str, tmp_path: Path, write_config
) -> None:
    env = {**os.environ, "PREFECT_API_URL": prefect_api}
    out = tmp_path / "out"
    with FakeServer() as server:
        cfg = fake_backend_config(server.base_url, out, prices=PRICES)
        first = subprocess.run([*BOOKSMITH, "run", "--config", str(write_config(cfg))],
                               env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
        assert first.returncode == 0, first.stderr[-2000:]
        assert first.stderr.startswith("estimate: 12 requests, "), first.stderr[:500]
        assert "no earlier run of this model" in first.stderr

        # the next plan's completion length comes from that version's mean
        (version,) = list_versions(out)
        gen = read_manifest(version).counts.generate
        mean = gen.completion_tokens / gen.completed
        cfg["seed"] = 8
        plan = subprocess.run([*BOOKSMITH, "plan", "--config", str(write_config(cfg, "b.yaml"))],
                              env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
        assert plan.returncode == 0, plan.stderr[-2000:]
        shown = " ".join(plan.stderr.split())
        assert f"{round(12 * min(mean, 256)):,} expected (the mean of 1 earlier version)" in shown

        # over the budget: "refuse" stops before the first request, "warn" says so and runs
        asked = server.stats()["requests"]
        cfg["generation"]["budget"] = {"max_cost_usd": 0.0001, "over_estimate": "refuse"}
        cfg["seed"] = 9
        refused = subprocess.run([*BOOKSMITH, "run", "--config", str(write_config(cfg, "c.yaml"))],
                                 env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
        assert refused.returncode == 2, refused.stderr[-2000:]
        line = refused.stderr.strip().splitlines()[-1]
        assert line.startswith(
            "error: generation.budget.max_cost_usd: the run is expected to cost $"
        )
        assert server.stats()["requests"] == asked  # nothing was asked
        assert len(list_versions(out)) == 1

        # just under the estimate ($0.035): warned, and the run spends up to the budget
        cfg["generation"]["budget"] = {"max_cost_usd": 0.03, "over_estimate": "warn"}
        warned = subprocess.run([*BOOKSMITH, "run", "--config", str(write_config(cfg, "d.yaml"))],
                                env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
        assert warned.returncode == 0, warned.stderr[-2000:]
        assert "warning: generation.budget.max_cost_usd: the run is expected to cost" in " ".join(
            warned.stderr.split()
        )
