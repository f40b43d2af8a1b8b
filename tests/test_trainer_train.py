"""The training loop end to end on CPU: falling loss, exact resume, SIGTERM, DDP with torchrun,
the CLI (train, export, compare) and the Prefect flow."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import typer
from typer.testing import CliRunner

from booksmith.schemas.config import ConfigError
from booksmith.trainer.checkpoint import CheckpointError, load_train_state
from booksmith.trainer.config import CONFIG_DIR, TrainConfig, load_train_config
from booksmith.trainer.synthetic import write_token_dataset
from booksmith.trainer.train import train

ROOT = Path(__file__).resolve().parents[1]
FAST = {
    "model": {"n_layer": 2, "n_head": 4, "n_embd": 64, "max_seq_len": 64},
    "train": {
        "seq_len": 32, "batch_size": 8, "max_steps": 30, "warmup_steps": 5, "eval_every": 10,
        "ckpt_every": 10, "log_every": 1, "eval_batches": 2,
    },
    "data": {"eval_fraction": 0.05, "eval_max_docs": 20, "shuffle_block": 2},
}  # fmt: skip


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_token_dataset(tmp_path_factory.mktemp("datasets") / "v1", 400, shards=2)


def _cfg(**train_overrides: object) -> TrainConfig:
    data = json.loads(json.dumps(FAST))
    data["train"].update(train_overrides)
    return TrainConfig.model_validate(data)


def _train_losses(run: Path) -> dict[int, float]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines) if r["kind"] == "train"}


def _quiet(_: str) -> None:
    pass


def test_loss_falls_and_resume_is_exact(dataset: Path, tmp_path: Path) -> None:
    cfg = _cfg()
    full = train(cfg, str(dataset), tmp_path / "full", log=_quiet)
    assert full["step"] == 30 and Path(full["checkpoint"]).name == "step-000030"
    losses = _train_losses(tmp_path / "full")
    assert sum(list(losses.values())[-5:]) < 0.6 * sum(list(losses.values())[:5])

    part = train(cfg, str(dataset), tmp_path / "cut", stop_after=13, log=_quiet)
    assert part["step"] == 13
    train(cfg, str(dataset), tmp_path / "cut", log=_quiet)  # resumes from cut/latest
    resumed = _train_losses(tmp_path / "cut")
    assert sorted(resumed) == list(range(1, 31))
    for step in range(14, 31):
        assert resumed[step] == pytest.approx(losses[step], abs=1e-6), step
    for name in ("step-000010", "step-000013", "step-000030", "latest", "loss.png", "run.json"):
        assert (tmp_path / "cut" / name).exists(), name
    assert load_train_state(tmp_path / "cut" / "latest")["step"] == 30


def test_resume_is_exact_with_dataloader_workers(dataset: Path, tmp_path: Path) -> None:
    data = json.loads(json.dumps(FAST))
    data["train"].update(max_steps=12, grad_accum=3)  # 36 batches: not a multiple of 2 workers
    data["data"]["num_workers"] = 2
    cfg = TrainConfig.model_validate(data)
    train(cfg, str(dataset), tmp_path / "full", log=_quiet)
    train(cfg, str(dataset), tmp_path / "cut", stop_after=5, log=_quiet)
    train(cfg, str(dataset), tmp_path / "cut", log=_quiet)
    assert _train_losses(tmp_path / "cut") == pytest.approx(_train_losses(tmp_path / "full"))


def test_resume_refuses_a_changed_run(dataset: Path, tmp_path: Path) -> None:
    train(_cfg(), str(dataset), tmp_path / "run", stop_after=2, log=_quiet)
    with pytest.raises(CheckpointError, match=r"train\.seq_len was 32 .* now 16"):
        train(_cfg(seq_len=16), str(dataset), tmp_path / "run", log=_quiet)
    bigger = TrainConfig.model_validate({**FAST, "model": {**FAST["model"], "n_embd": 128}})
    with pytest.raises(CheckpointError, match="model"):
        train(bigger, str(dataset), tmp_path / "run", log=_quiet)


def test_eval_set_is_kept_once_per_corpus(dataset: Path, tmp_path: Path) -> None:
    kept = dataset.parent / "_state" / "trainer" / "eval-bytes.parquet"
    train(_cfg(max_steps=2), str(dataset), tmp_path / "a", log=_quiet)
    assert kept.is_file()
    other = write_token_dataset(dataset.parent / "v2", 200, shards=1, seed=9)
    train(_cfg(max_steps=2), str(other), tmp_path / "b", log=_quiet)
    infos = [json.loads((tmp_path / r / "run.json").read_text()) for r in ("a", "b")]
    assert infos[0]["eval"]["sha256"] == infos[1]["eval"]["sha256"]
    assert infos[1]["eval"]["origin"] == str(kept)


def test_config_errors_name_file_and_key(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  n_layer: 2\n  n_embed: 64\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml:3: model\.n_embed: unknown key"):
        load_train_config(bad)
    for name in ("tiny", "small", "phi-1_5", "phi-2"):
        load_train_config(CONFIG_DIR / f"{name}.yaml")


def _app() -> typer.Typer:
    from booksmith.flows.cli_train import app

    root = typer.Typer()
    root.add_typer(app, name="train")
    return root


def test_cli_train_export_compare(dataset: Path, tmp_path: Path) -> None:
    """Two corpora judged by the models they train, on one shared eval set: compare prints
    each run's eval losses as its metrics recorded them."""
    other = write_token_dataset(tmp_path / "other" / "v1", 60, shards=1, seed=5)
    shared_eval = write_token_dataset(tmp_path / "eval" / "v1", 30, shards=1, seed=9)
    cfg = tmp_path / "fast.yaml"
    spec = json.loads(json.dumps(FAST))
    spec["data"]["eval_data"] = str(shared_eval)
    cfg.write_text(json.dumps(spec))  # JSON is YAML
    runner, app = CliRunner(), _app()
    for run, data, steps in (("r1", dataset, "10"), ("r2", other, "20")):
        res = runner.invoke(
            app,
            ["train", "--data", str(data), "--config", str(cfg), "--out",
             str(tmp_path / run), "--max-steps", steps],
        )  # fmt: skip
        assert res.exit_code == 0, res.output
    res = runner.invoke(  # the synthetic byte vocabulary has no tokenizer to export
        app,
        ["train", "export", str(tmp_path / "r2" / "latest"), str(tmp_path / "hf"),
         "--no-tokenizer"],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    assert (tmp_path / "hf" / "model.safetensors").is_file()
    res = runner.invoke(app, ["train", "compare", str(tmp_path / "r1"), str(tmp_path / "r2")])
    assert res.exit_code == 0, res.output
    assert "warning" not in res.output  # one eval set: the losses compare
    evals = [_eval_losses(tmp_path / run) for run in ("r1", "r2")]
    assert evals[0][2560] != evals[1][2560]  # two corpora, two models
    rows = {line.split("│")[1].strip(): line for line in res.output.splitlines() if "│" in line}
    # 10 steps x 8 x 32 tokens: both runs evaluated there; r2 alone after 20 steps
    assert f"{evals[0][2560]:.4f}" in rows["2,560"] and f"{evals[1][2560]:.4f}" in rows["2,560"]
    assert f"{evals[1][5120]:.4f}" in rows["5,120"] and " - " in rows["5,120"]
    final = [f"{max(e.items())[1]:.4f}" for e in evals]
    assert all(v in rows["final"] for v in final), rows["final"]
    bad = runner.invoke(
        app, ["train", "--data", str(tmp_path / "nope"), "--config", "tiny", "--out", str(tmp_path)]
    )
    assert bad.exit_code == 2 and "--data: nothing at" in bad.output
    bad = runner.invoke(app, ["train", "export", str(tmp_path / "r1"), str(tmp_path / "x")])
    assert bad.exit_code == 2 and "not a checkpoint" in bad.output


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


@pytest.mark.slow
def test_sigterm_writes_a_checkpoint_and_the_run_resumes(dataset: Path, tmp_path: Path) -> None:
    cfg = tmp_path / "long.yaml"
    cfg.write_text(json.dumps({**FAST, "train": {**FAST["train"], "max_steps": 100000}}))
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "booksmith.trainer", "--data", str(dataset), "--config", str(cfg),
         "--out", str(out)],
        cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (out / "step-000020").exists():
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, output
    assert "SIGTERM: checkpointing" in output
    step = load_train_state(out / "latest")["step"]
    assert 20 <= step < 100000
    done = train(_cfg(max_steps=step + 3), str(dataset), out, log=_quiet)
    assert done["step"] == step + 3


@pytest.mark.slow
@pytest.mark.e2e
def test_ddp_two_processes_with_torchrun(dataset: Path, tmp_path: Path) -> None:
    cfg = tmp_path / "ddp.yaml"
    cfg.write_text(json.dumps({**FAST, "train": {**FAST["train"], "max_steps": 12}}))
    out = tmp_path / "ddp"

    def torchrun(max_steps: int) -> str:
        res = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
             "-m", "booksmith.trainer", "--data", str(dataset), "--config", str(cfg),
             "--out", str(out), "--max-steps", str(max_steps)],
            cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert res.returncode == 0, res.stdout + res.stderr
        return res.stdout + res.stderr

    torchrun(12)
    state = load_train_state(out / "latest")
    assert state["step"] == 12 and sorted(state["loader"]["streams"]) == [0, 1]
    meta = json.loads((out / "latest" / "meta.json").read_text())
    assert meta["world_size"] == 2 and meta["tokens_seen"] == 12 * 8 * 32 * 2
    losses = _train_losses(out)
    assert losses[12] < losses[1]
    # ranks stay in step after a resume, and a single process may not resume a 2-rank run
    torchrun(15)
    assert load_train_state(out / "latest")["step"] == 15
    with pytest.raises(CheckpointError, match="world_size=2, now 1"):
        train(_cfg(max_steps=20), str(dataset), out, log=_quiet)


@pytest.mark.slow
def test_tiny_config_trains_a_few_hundred_steps(dataset: Path, tmp_path: Path) -> None:
    cfg = load_train_config(CONFIG_DIR / "tiny.yaml")
    summary = train(cfg, str(dataset), tmp_path / "tiny", log=_quiet)
    assert summary["step"] == 300
    records = [
        json.loads(x) for x in (tmp_path / "tiny" / "metrics.jsonl").read_text().splitlines()
    ]
    evals = [r["eval_loss"] for r in records if r["kind"] == "eval"]
    assert len(evals) == 6 and evals[-1] < evals[0] < 5.6 and evals[-1] < 1.5
    # on CPU: tokens per second, no MFU (a measured CPU peak is too noisy to divide by)
    assert all(r["mfu"] is None and r["tok_per_s"] > 0 for r in records if r["kind"] == "train")
    assert torch.load(tmp_path / "tiny" / "latest" / "model.pt", weights_only=True)


@pytest.mark.slow
@pytest.mark.e2e
def test_prefect_train_flow(prefect_api: None, dataset: Path, tmp_path: Path) -> None:
    from booksmith.flows.train import train_flow

    cfg = tmp_path / "fast.yaml"
    cfg.write_text(json.dumps(FAST))
    result = train_flow(data=str(dataset), config=str(cfg), out=str(tmp_path / "flow"), max_steps=5)
    assert result["step"] == 5
    assert (tmp_path / "flow" / "latest" / "model.pt").is_file()


def test_bf16_autocast_on_cpu_trains_close_to_fp32(dataset: Path, tmp_path: Path) -> None:
    """dtype: bfloat16 runs the matmuls in bf16 (so the losses differ from fp32's, a little)
    and still learns."""
    fp32 = _train_losses_of(_cfg(max_steps=6, dtype="float32"), dataset, tmp_path / "fp32")
    bf16 = _train_losses_of(_cfg(max_steps=6, dtype="bfloat16"), dataset, tmp_path / "bf16")
    assert fp32.keys() == bf16.keys()
    assert any(abs(bf16[s] - fp32[s]) > 1e-4 for s in fp32)  # autocast did change the math
    assert all(abs(bf16[s] - fp32[s]) < 0.05 * fp32[s] for s in fp32)


@pytest.mark.slow
def test_torch_compile_on_cpu_matches_eager(dataset: Path, tmp_path: Path) -> None:
    """compile: true runs the model through torch.compile (inductor, C++ on CPU) to the same
    losses as eager mode."""
    import torch._dynamo

    torch._dynamo.reset()
    eager = _train_losses_of(_cfg(max_steps=4, dtype="float32"), dataset, tmp_path / "eager")
    torch._dynamo.utils.counters.clear()
    compiled = _train_losses_of(
        _cfg(max_steps=4, dtype="float32", compile=True), dataset, tmp_path / "compiled"
    )
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # it was compiled
    assert compiled.keys() == eager.keys()
    for step, loss in eager.items():
        assert compiled[step] == pytest.approx(loss, rel=1e-3), step


def _eval_losses(run: Path) -> dict[int, float]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return {r["tokens"]: r["eval_loss"] for r in map(json.loads, lines) if r["kind"] == "eval"}


def _train_losses_of(cfg: TrainConfig, dataset: Path, out: Path) -> dict[int, float]:
    train(cfg, str(dataset), out, log=_quiet)
    return _train_losses(out)
