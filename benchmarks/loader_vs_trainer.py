"""The loader must never be what the trainer waits for: tokens/s the token-shard loader
delivers (packed, shuffled windows in batches, one process, no DataLoader workers) against the
tokens/s a training step of the tiny config consumes, on the same machine and thread count.

    python -m benchmarks.loader_vs_trainer [--docs 20000] [--config trainer/configs/tiny.yaml]

The data: a synthetic token dataset (trainer.synthetic, bytes encoding) in a temporary
directory. Ends with `RESULT loader_vs_trainer:trainer ratio=<loader/trainer> ...` in tokens/s;
the issue asks for at least 10.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from itertools import islice
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from booksmith.trainer.config import CONFIG_DIR, load_train_config
from booksmith.trainer.data import TokenWindows, collate, open_source
from booksmith.trainer.model import ModelConfig, Phi, padded_vocab
from booksmith.trainer.synthetic import write_token_dataset


def loader_rate(data: Path, seq_len: int, batch: int, batches: int) -> float:
    src = open_source(str(data))
    loader = DataLoader(TokenWindows(src, seq_len, seed=0), batch_size=batch, collate_fn=collate)
    it = iter(loader)
    next(it)
    t0 = time.perf_counter()
    n = sum(w.shape[0] * (w.shape[1] - 1) for w, _, _ in islice(it, batches))
    return n / (time.perf_counter() - t0)


def trainer_rate(data: Path, config: Path, steps: int) -> float:
    cfg = load_train_config(config)
    t = cfg.train
    src = open_source(str(data))
    mcfg = ModelConfig(**cfg.model.model_dump(), vocab_size=padded_vocab(src.n_vocab))
    model = Phi(mcfg).train()
    opt = torch.optim.AdamW(model.optim_groups(t.weight_decay), lr=t.lr, fused=True)
    w = torch.randint(0, src.n_vocab, (t.batch_size, t.seq_len + 1))

    def step() -> None:
        model(w[:, :-1], w[:, 1:]).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return t.batch_size * t.seq_len * steps / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--docs", type=int, default=20000)
    p.add_argument("--config", type=Path, default=CONFIG_DIR / "tiny.yaml")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    t = load_train_config(args.config).train
    with tempfile.TemporaryDirectory() as tmp:
        data = write_token_dataset(Path(tmp) / "v1", args.docs, shards=4, row_group_size=500)
        batches = 2000 // max(1, t.seq_len // 64)
        best_loader = best_trainer = 0.0
        for r in range(args.rounds):
            lr_ = loader_rate(data, t.seq_len, t.batch_size, batches)
            tr_ = trainer_rate(data, args.config, args.steps)
            best_loader, best_trainer = max(best_loader, lr_), max(best_trainer, tr_)
            print(f"round {r + 1}: loader {lr_:,.0f} tokens/s, trainer {tr_:,.0f} tokens/s")
    print(
        f"{args.config.name}: batch {t.batch_size} x {t.seq_len}, {args.threads} threads, "
        "loader in-process (no workers)"
    )
    print(
        f"RESULT loader_vs_trainer:trainer ratio={best_loader / best_trainer:.3f} "
        f"booksmith={best_loader:.0f} baseline={best_trainer:.0f} unit=tokens/s"
    )


if __name__ == "__main__":
    main()
