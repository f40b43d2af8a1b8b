"""GPU training throughput and MFU of a 125M-350M config (bf16 autocast, torch.compile).

Random token shards (a 50,257-token vocabulary, uint16, as GPT-2's) in a temporary directory,
the trainer's own loop (`trainer.train.train`) with trainer/configs/small.yaml unless told
otherwise; figures are the median of the logged intervals after the first (compilation).

    python -m benchmarks.trainer_gpu [--config trainer/configs/small.yaml] [--steps 60]
    torchrun --nproc_per_node 8 -m benchmarks.trainer_gpu     (DDP)

Ends with `RESULT trainer_gpu:mfu_goal ratio=<MFU/45%> booksmith=<MFU %> baseline=45 unit=MFU%`
(the issue's goal; nanoGPT reports about 37% on an A100). Needs a CUDA device.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from booksmith.trainer.config import CONFIG_DIR, load_train_config
from booksmith.trainer.train import train

VOCAB, EOT = 50257, 50256


def random_shards(root: Path, docs: int = 4000, doc_len: int = 1024) -> Path:
    rng = np.random.default_rng(0)
    tdir = root / "tokens" / "gpt2"
    tdir.mkdir(parents=True)
    for s in range(4):
        ids = rng.integers(0, EOT, size=(docs // 4, doc_len), dtype=np.uint16)
        ids[:, -1] = EOT
        table = pa.table(
            {
                "id": [f"r{s}-{i}" for i in range(ids.shape[0])],
                "input_ids": pa.array(list(ids), pa.list_(pa.uint16())),
                "n_tokens": pa.array([doc_len] * ids.shape[0], pa.int64()),
            }
        )
        pq.write_table(table, tdir / f"part-{s:05d}.parquet", row_group_size=100)
    manifest = {"tokens": {"gpt2": {"n_vocab": VOCAB, "eot_token": EOT, "path": "tokens/gpt2"}}}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", type=Path, default=CONFIG_DIR / "small.yaml")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--grad-accum", type=int, default=None)
    p.add_argument("--no-compile", action="store_true")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks.trainer_gpu needs a CUDA device")
    overrides = {
        "train.max_steps": args.steps,
        "train.log_every": 10,
        "train.eval_every": 0,
        "train.ckpt_every": 0,
        "train.warmup_steps": 10,
        "train.batch_size": args.batch_size,
        "train.grad_accum": args.grad_accum,
        "train.compile": False if args.no_compile else None,
        "data.eval_max_docs": 8,
    }
    cfg = load_train_config(args.config, overrides)
    with tempfile.TemporaryDirectory() as tmp:
        data = random_shards(Path(tmp) / "v1")
        out = Path(tmp) / "run"
        summary = train(cfg, str(data), out)
        if summary["rank"] != 0:
            return
        logs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train_logs = [r for r in logs if r["kind"] == "train"][1:]  # the first includes compilation
    tps = statistics.median(r["tok_per_s"] for r in train_logs)
    mfu = statistics.median(r["mfu"] for r in train_logs) if train_logs[0]["mfu"] else 0.0
    print(
        f"{torch.cuda.get_device_name()}, torch {torch.__version__}, {args.config.name}, "
        f"batch {cfg.train.batch_size} x {cfg.train.seq_len} x accum {cfg.train.grad_accum}, "
        f"compile {cfg.train.compile}: {tps:,.0f} tokens/s, MFU {100 * mfu:.1f}%"
    )
    print(
        f"RESULT trainer_gpu:mfu_goal ratio={mfu / 0.45:.3f} booksmith={100 * mfu:.1f} "
        f"baseline=45 unit=MFU%"
    )


if __name__ == "__main__":
    main()
