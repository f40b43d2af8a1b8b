"""Training throughput on CPU: booksmith's Phi against transformers' PhiForCausalLM.

Same shape, same random weights, same batch of token windows, same thread count, fp32, and the
same optimizer (torch AdamW, fused) on both sides; a step is forward, loss, backward, clip and
optimizer step. transformers computes its loss its own way (`labels=` with `shift_labels=`, which
upcasts the logits and calls cross_entropy). The sides alternate A B A B; the best round counts.

    python -m benchmarks.trainer_vs_hf [--vocab 49152] [--layers 4] [--hidden 256]
                                       [--batch 8] [--seq 256] [--threads 2] [--steps 4]

Ends with `RESULT trainer_vs_hf:transformers ratio=<booksmith/transformers> ...` in training
tokens/s (higher is better).
"""

from __future__ import annotations

import argparse
import platform
import time
from collections.abc import Callable

import torch


def build(args: argparse.Namespace) -> tuple[torch.nn.Module, torch.nn.Module]:
    from transformers import PhiConfig, PhiForCausalLM

    from booksmith.trainer.export import from_hf_state_dict, hf_config
    from booksmith.trainer.model import ModelConfig

    cfg = ModelConfig(
        vocab_size=args.vocab,
        n_layer=args.layers,
        n_head=args.hidden // 32,
        n_embd=args.hidden,
        max_seq_len=args.seq,
    )
    fields = hf_config(cfg)
    for k in ("architectures", "model_type", "torch_dtype"):
        fields.pop(k)
    torch.manual_seed(0)
    hf = PhiForCausalLM(PhiConfig(**fields))
    assert hf.config._attn_implementation == "sdpa", hf.config._attn_implementation
    ours = from_hf_state_dict(cfg, hf.state_dict())
    return ours.train(), hf.train()


def step_fn(model: torch.nn.Module, hf: bool) -> Callable[[torch.Tensor], float]:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=True)

    def step(w: torch.Tensor) -> float:
        x, y = w[:, :-1].contiguous(), w[:, 1:].contiguous()
        loss = model(input_ids=x, labels=y, shift_labels=y).loss if hf else model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step


def tokens_per_s(step: Callable[[torch.Tensor], float], w: torch.Tensor, steps: int) -> float:
    t0 = time.perf_counter()
    for _ in range(steps):
        step(w)
    return w.shape[0] * (w.shape[1] - 1) * steps / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=4, help="timed steps per round")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    ours, hf = build(args)
    w = torch.randint(
        0, args.vocab, (args.batch, args.seq + 1), generator=torch.Generator().manual_seed(1)
    )
    sides = {"booksmith": step_fn(ours, hf=False), "transformers": step_fn(hf, hf=True)}
    first = {name: s(w) for name, s in sides.items()}  # warm-up; same weights, same loss
    print(
        f"first-step loss: booksmith {first['booksmith']:.5f} "
        f"transformers {first['transformers']:.5f}"
    )
    best = dict.fromkeys(sides, 0.0)
    for r in range(args.rounds):
        for name, s in sides.items():
            tps = tokens_per_s(s, w, args.steps)
            best[name] = max(best[name], tps)
            print(f"round {r + 1} {name:>12}: {tps:8.0f} tokens/s")
    print(
        f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{args.threads} threads, {args.layers} layers x {args.hidden}, vocab {args.vocab}, "
        f"batch {args.batch} x {args.seq}, fp32"
    )
    bs, base = best["booksmith"], best["transformers"]
    print(
        f"RESULT trainer_vs_hf:transformers ratio={bs / base:.3f} booksmith={bs:.0f} "
        f"baseline={base:.0f} unit=tokens/s"
    )


if __name__ == "__main__":
    main()
