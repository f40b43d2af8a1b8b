"""A trainer that says what it does (issue 20, point 4): the header before the first step, a run's
files under --out (the corpus's eval set excepted, and named), tokens per second instead of MFU
on CPU, a missing --config as an error, and `datasets tokenize INPUT --out DIR` turning the
output of `booksmith filter` and `booksmith dedup` into shards `train --data DIR` reads."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

from booksmith.flows.cli import app
from booksmith.shards.encodings import get_encoding
from booksmith.shards.version_dir import read_manifest
from booksmith.trainer import __main__ as trainer_main
from booksmith.trainer.config import TrainConfig
from booksmith.trainer.data import DataError, open_source
from booksmith.trainer.mfu import device_peak
from booksmith.trainer.model import ModelConfig, Phi, padded_vocab
from booksmith.trainer.synthetic import write_token_dataset
from booksmith.trainer.train import MAX_PASSES, train

FIXTURES = Path(__file__).parent / "fixtures"
SMALL = {
    "model": {"n_layer": 1, "n_head": 2, "n_embd": 32, "max_seq_len": 32},
    "train": {"seq_len": 16, "batch_size": 4, "max_steps": 3, "warmup_steps": 1,
              "eval_every": 0, "ckpt_every": 0, "log_every": 1, "eval_batches": 1},
    "data": {"eval_fraction": 0.05, "eval_max_docs": 8, "shuffle_block": 2},
}  # fmt: skip


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _cfg(**train: object) -> TrainConfig:
    data = json.loads(json.dumps(SMALL))
    data["train"].update(train)
    return TrainConfig.model_validate(data)


def _files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


def test_header_comes_first_and_says_what_the_run_does(tmp_path: Path) -> None:
    version = write_token_dataset(tmp_path / "out" / "v1", 200, shards=2)
    lines: list[str] = []
    run = tmp_path / "runs" / "r1"
    summary = train(_cfg(), str(version), run, log=lines.append, config_path="small.yaml")
    first_step = next(i for i, line in enumerate(lines) if line.startswith("step 1 "))
    header = "\n".join(lines[:first_step])
    facts = summary["plan"]
    assert json.loads((run / "run.json").read_text())["plan"] == facts

    model = Phi(ModelConfig(**SMALL["model"], vocab_size=padded_vocab(256)))  # type: ignore[arg-type]
    params = sum(p.numel() for p in model.parameters())
    stored = read_manifest(version).tokens["bytes"].stored_tokens
    assert facts["parameters"] == params and facts["data_tokens"] == stored
    assert facts["data_documents"] == 200 and facts["tokens_per_step"] == 4 * 16
    assert facts["train_tokens"] == stored - facts["eval_tokens"] > 0
    assert facts["passes"] == pytest.approx(3 * 64 / facts["train_tokens"])
    assert not facts["passes_warning"] and "warning" not in header
    assert "config   small.yaml" in header
    assert f"{stored:,} tokens in 200 documents" in header
    assert "3 x 64 tokens (batch 4 x seq 16 x accum 1) = 192 tokens" in header
    assert f"passes   {facts['passes']:.1f} over the {facts['train_tokens']:,} training" in header
    assert f"writes   {run}/" in header
    kept = tmp_path / "out" / "_state" / "trainer" / "eval-bytes.parquet"
    assert f"{facts['eval_tokens']:,} tokens: {kept}" in header
    assert f"chosen now as the eval set of every version under {tmp_path / 'out'}" in header
    assert "no MFU on CPU" in header


def test_many_passes_over_the_data_warn(tmp_path: Path) -> None:
    version = write_token_dataset(tmp_path / "out" / "v1", 20, shards=1, row_group_size=10)
    lines: list[str] = []
    summary = train(_cfg(max_steps=400), str(version), tmp_path / "r", stop_after=1,
                    log=lines.append)  # fmt: skip
    facts = summary["plan"]
    assert facts["passes"] > MAX_PASSES and facts["passes_warning"]
    warning = next(line for line in lines if line.startswith("warning:"))
    steps = int(MAX_PASSES * facts["train_tokens"] // 64)
    assert f"{facts['passes']:.1f} passes over the data" in warning
    assert f"--max-steps {steps}" in warning
    assert lines.index(warning) < next(i for i, x in enumerate(lines) if x.startswith("step 1 "))


def test_a_runs_files_are_under_out_but_the_corpus_eval_set(tmp_path: Path) -> None:
    """Everything a run writes is under --out, except the corpus's reference eval set, which
    the header names; where the corpus cannot take it, the run keeps it and says so."""
    version = write_token_dataset(tmp_path / "out" / "v1", 120, shards=1)
    before = _files(tmp_path)
    lines: list[str] = []
    run = tmp_path / "runs" / "a"
    train(_cfg(), str(version), run, log=lines.append)
    outside = {p for p in _files(tmp_path) - before if run not in p.parents}
    kept = tmp_path / "out" / "_state" / "trainer" / "eval-bytes.parquet"
    assert outside == {kept}
    assert any(str(kept) in line for line in lines if line.startswith("eval "))
    # a second version of the corpus is judged on the same set, and nothing new lands outside
    other = write_token_dataset(tmp_path / "out" / "v2", 80, shards=1, seed=3)
    before = _files(tmp_path)
    lines.clear()
    train(_cfg(), str(other), tmp_path / "runs" / "b", log=lines.append)
    assert {
        p for p in _files(tmp_path) - before if tmp_path / "runs" / "b" not in p.parents
    } == set()
    assert any(f"every version under {tmp_path / 'out'} is judged on it" in x for x in lines)

    # a corpus that cannot hold it (here `_state` is a file): the run keeps its own copy
    corpus = tmp_path / "ro"
    ro_version = write_token_dataset(corpus / "v1", 120, shards=1)
    (corpus / "_state").write_text("not a directory")
    lines.clear()
    train(_cfg(), str(ro_version), tmp_path / "runs" / "c", log=lines.append)
    assert (tmp_path / "runs" / "c" / "eval-bytes.parquet").is_file()
    eval_lines = " ".join(x for x in lines if x.startswith(("eval ", "     ")))
    assert "kept in the run" in eval_lines and f"{corpus} is not writable" in eval_lines


def test_cpu_reports_tokens_per_second_not_mfu(tmp_path: Path) -> None:
    version = write_token_dataset(tmp_path / "v1", 60, shards=1)
    lines: list[str] = []
    train(_cfg(), str(version), tmp_path / "r", log=lines.append)
    records = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["kind"] == "train"]
    assert steps and all(r["mfu"] is None and r["tok_per_s"] > 0 for r in steps)
    step_lines = [x for x in lines if x.startswith("step ") and "| lr " in x]
    assert step_lines and all("tok/s" in x and "mfu" not in x for x in step_lines)
    assert device_peak(torch.device("cpu")) is None


def test_a_missing_config_is_an_error_that_lists_the_bundled_ones(tmp_path: Path) -> None:
    version = write_token_dataset(tmp_path / "v1", 30, shards=1)
    res = CliRunner().invoke(app, ["train", "--data", str(version), "--out", str(tmp_path / "r")])
    assert res.exit_code == 2, res.output
    assert len(res.output.strip().splitlines()) == 1 and "Traceback" not in res.output
    for word in ("--config", "tiny (2 layers x 64)", "small", "phi-1_5", "phi-2"):
        assert word in res.output
    assert not (tmp_path / "r").exists()
    code = trainer_main.main(["--data", str(version), "--out", str(tmp_path / "r")])
    assert code == 2 and not (tmp_path / "r").exists()


def _corpus(path: Path, n: int = 30) -> Path:
    """Textbook-like records (paragraphs of the quality fixture), four exact repeats."""
    rows = [json.loads(x) for x in (FIXTURES / "quality_labelled.jsonl").read_text().splitlines()]
    good = [r["text"] for r in rows if r["score"] >= 3]
    docs = ["\n\n".join(random.Random(i).sample(good, 8)) for i in range(n)]
    records = [{"id": i, "text": t} for i, t in enumerate(docs + docs[:4])]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_filter_and_dedup_output_tokenize_and_train(tmp_path: Path) -> None:
    """dedup -> filter -> datasets tokenize --out DIR -> train --data DIR, no code."""
    runner = CliRunner()
    src = _corpus(tmp_path / "corpus.jsonl")
    res = runner.invoke(app, ["dedup", str(src), "--out", str(tmp_path / "d")])
    assert res.exit_code == 0, res.output
    res = runner.invoke(
        app, ["filter", str(tmp_path / "d" / "kept.parquet"), "--out", str(tmp_path / "f"),
              "--no-langid"],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    kept = pq.read_table(tmp_path / "f" / "kept.parquet")
    assert kept.num_rows == 30

    # dedup's output directory, the default encoding (cl100k_base, as a version's primary)
    res = runner.invoke(app, ["datasets", "tokenize", str(tmp_path / "d"), "--out",
                              str(tmp_path / "tok-d")])  # fmt: skip
    assert res.exit_code == 0, res.output
    info = json.loads((tmp_path / "tok-d" / "tokens.json").read_text())["tokens"]["cl100k_base"]
    assert info["documents"] == 30 and info["n_vocab"] == 100_277
    assert info["source"] == str(tmp_path / "d" / "kept.parquet")
    src_d = open_source(str(tmp_path / "tok-d"))
    assert (src_d.encoding, src_d.n_vocab, src_d.eot_token) == ("cl100k_base", 100_277, 100_257)

    # filter's kept.parquet under SmolLM2's encoding: the rows are the texts' tokens
    tok = tmp_path / "tok"
    res = runner.invoke(app, ["datasets", "tokenize", str(tmp_path / "f" / "kept.parquet"),
                              "--out", str(tok), "--encoding", "smollm2"])  # fmt: skip
    assert res.exit_code == 0, res.output
    enc = get_encoding("smollm2")
    rows = pq.read_table(tok / "tokens" / "smollm2").to_pylist()
    texts = dict(zip(kept.column("id").to_pylist(), kept.column("text").to_pylist(), strict=True))
    assert len(rows) == 30
    for row in rows:
        assert row["input_ids"] == [*enc.encode_ordinary(texts[row["id"]]), enc.eot_token]
    src_t = open_source(str(tok))
    assert (src_t.n_vocab, src_t.eot_token) == (49_152, 0)
    assert src_t.tokens == sum(len(r["input_ids"]) for r in rows)
    # again: the encoding's shards are replaced, not added to
    res = runner.invoke(app, ["datasets", "tokenize", str(tmp_path / "f"), "--out", str(tok),
                              "--encoding", "smollm2"])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert pq.read_table(tok / "tokens" / "smollm2").num_rows == 30

    res = runner.invoke(app, ["train", "--data", str(tok), "--config", "tiny", "--out",
                              str(tmp_path / "run"), "--max-steps", "2"])  # fmt: skip
    assert res.exit_code == 0, res.output
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["encoding"] == "smollm2" and run["n_vocab"] == 49_152
    assert run["plan"]["data_documents"] == 30 and run["plan"]["config"].endswith("tiny.yaml")
    assert (tmp_path / "run" / "latest" / "model.pt").is_file()


def test_tokenize_errors_are_one_line(tmp_path: Path) -> None:
    runner = CliRunner()
    src = _corpus(tmp_path / "corpus.jsonl", n=3)
    res = runner.invoke(app, ["datasets", "tokenize", str(src), "--encoding", "smollm2"])
    assert res.exit_code == 2 and "not a dataset version" in res.output and "--out" in res.output
    (tmp_path / "empty").mkdir()
    res = runner.invoke(app, ["datasets", "tokenize", str(tmp_path / "empty"), "--out",
                              str(tmp_path / "t")])  # fmt: skip
    assert res.exit_code == 2 and "kept.parquet" in res.output
    foreign = tmp_path / "foreign" / "tokens" / "cl100k_base"
    foreign.mkdir(parents=True)
    (foreign / "part-00000.parquet").write_bytes(b"PAR1")
    res = runner.invoke(app, ["datasets", "tokenize", str(src), "--out", str(tmp_path / "foreign")])
    assert res.exit_code == 2 and "did not write" in res.output
    assert (foreign / "part-00000.parquet").read_bytes() == b"PAR1"


def test_tokens_json_gives_the_vocabulary_of_bare_shards(tmp_path: Path) -> None:
    """A directory `datasets tokenize` wrote says its vocabulary and end-of-text in tokens.json
    (an encoding the trainer does not know would otherwise get the largest id + 1)."""
    root = write_token_dataset(tmp_path / "d", 40, shards=1, manifest=False)
    assert open_source(str(root)).n_vocab < 256  # only the bytes the texts use
    entry = {"n_vocab": 300, "eot_token": 0, "documents": 40}
    (root / "tokens.json").write_text(json.dumps({"tokens": {"bytes": entry}}))
    src = open_source(str(root))
    assert (src.n_vocab, src.eot_token, src.kind) == (300, 0, "datasets tokenize output")
    (root / "tokens.json").write_text(json.dumps({"tokens": {"other": entry}}))
    with pytest.raises(DataError, match=r"tokens\.json: no usable entry for 'bytes'"):
        open_source(str(root))


def test_the_train_flow_without_a_config_trains_tiny_and_says_so(tmp_path: Path) -> None:
    """The nightly's train.config and the Prefect deployment default to the tiny config (as
    documented), named in the header and run.json, never the built-in defaults."""
    from booksmith.flows.train import train_model

    version = write_token_dataset(tmp_path / "out" / "v1", 40, shards=1)
    result = train_model.fn(str(version), None, str(tmp_path / "run"), 1, 1)
    assert result["plan"]["config"].endswith("trainer/configs/tiny.yaml")
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["config"]["train"]["seq_len"] == 64  # tiny.yaml's, not the default 32


def test_train_checks_its_data_and_out_before_torch_starts(tmp_path: Path) -> None:
    """A missing --data and an --out under a file: both at once, one line each, exit 2,
    nothing written; the train flow checks the same (its state message says which)."""
    from booksmith.flows.train import train_flow

    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    missing = tmp_path / "no-such-version"
    args = ["train", "--data", str(missing), "--out", str(blocker / "r"), "--config", "tiny"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 2, res.output
    assert res.output.strip().splitlines() == [
        f"error: --data: nothing at {missing}; give a dataset version, a shard directory or "
        "glob, or a URL",
        f"error: --out: {blocker} is a file, not a directory; choose another --out",
    ]
    glob = str(tmp_path / "shards-*.parquet")
    res = CliRunner().invoke(app, ["train", "--data", glob, "--out", str(tmp_path / "r"),
                                   "--config", "tiny"])  # fmt: skip
    assert res.exit_code == 2 and "--data: nothing at" in res.output
    with pytest.raises(ValueError, match=r"^data: nothing at .*no-such-version"):
        train_flow.fn(str(missing), out=str(tmp_path / "r"))
    assert not (tmp_path / "r").exists()


def test_readable_asks_urls_through_fsspec() -> None:
    import fsspec

    from booksmith.shards.reachable import readable

    fs = fsspec.filesystem("memory")
    fs.pipe("/corpus/v1/manifest.json", b"{}")
    assert readable("memory://corpus/v1", "--data") == []
    assert readable("memory://corpus/v*", "--data") == []
    assert readable("memory://corpus/v2", "--data") == [
        "--data: nothing at memory://corpus/v2; give a dataset version, a shard directory or "
        "glob, or a URL"
    ]
