"""The training loop: one process, or one per device under torchrun (DDP).

    python -m booksmith.trainer --data DATASET --config trainer/configs/tiny.yaml --out runs/tiny
    torchrun --nproc_per_node 8 -m booksmith.trainer --data s3://b/v1 --config small.yaml --out r
    torchrun --nnodes 4 --node_rank R --rdzv_backend c10d --rdzv_endpoint HOST:29500 \\
        --nproc_per_node 8 -m booksmith.trainer ...      (multi-node: torchrun's rendezvous flags)

AdamW (fused where available) with decay on matrices only, linear warmup then cosine decay to
min_lr, gradient accumulation, clipping, bf16 autocast on CUDA and fp32 on CPU, optional
torch.compile. Every `eval_every` steps: loss on the reference eval set. Every `ckpt_every`
steps, at the end and on SIGTERM: a checkpoint with the loader's position, so a resumed run
continues with the same batches and the same losses. Before the first step, a header says
what the run is (`plan`): the model's parameters, the data's tokens, tokens per step, the
passes over the data the config implies (a warning above MAX_PASSES), the eval set and where it
lives, and where the run writes. Logs go to the console, OUT/metrics.jsonl and OUT/loss.png;
everything the run writes is under OUT, except a dataset version's reference eval set, which
is the corpus's (see `reference_eval`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader

from booksmith.shards.files import write_table_atomically
from booksmith.trainer import checkpoint
from booksmith.trainer.config import TrainConfig
from booksmith.trainer.data import (
    DataError,
    TokenSource,
    TokenWindows,
    collate,
    eval_windows,
    held_out,
    open_source,
    read_units,
)
from booksmith.trainer.loss import free_workspace
from booksmith.trainer.mfu import device_peak
from booksmith.trainer.model import ModelConfig, Phi, padded_vocab


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(
        default_factory=lambda: torch.device("cpu")
    )  # collectives' tensors

    @property
    def master(self) -> bool:
        return self.rank == 0


def setup_distributed() -> tuple[Dist, torch.device]:
    """DDP when launched by torchrun (NCCL on CUDA, gloo on CPU); a single process otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 leftovers outside autocast
        torch.backends.cudnn.allow_tf32 = True
    else:
        device = torch.device("cpu")
    d = Dist(int(os.environ.get("RANK", "0")), world, local_rank, device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return d, device


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to lr, then cosine decay to min_lr at max_steps."""
    t = cfg.train
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    span = max(1, t.max_steps - t.warmup_steps)
    progress = min(1.0, (step - t.warmup_steps) / span)
    return t.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (t.lr - t.min_lr)


def _sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def corpus_eval_path(src: TokenSource) -> Path | None:
    """Where a dataset version's corpus keeps its reference eval set: `<out>/_state/trainer/
    eval-<encoding>.parquet` beside the versions under one output, None for other data."""
    if src.root is None:
        return None
    return Path(src.root).parent / "_state" / "trainer" / f"eval-{src.encoding}.parquet"


def reference_eval(src: TokenSource, cfg: TrainConfig, out: Path, master: bool) -> dict[str, Any]:
    """The fixed eval set: `data.eval_data` if given; else a held-out slice of the data, never
    trained on. For a dataset version the slice is the corpus's: chosen on the first run over
    any version under that output and kept at `corpus_eval_path` (so later versions are judged
    on the same documents); where that cannot be written, in the run's own OUT. For other data
    it is chosen again each run (the same documents for the same shards: an id hash).
    `where` says which, for the header."""
    d = cfg.data
    held_here = False
    if d.eval_data:
        esrc = open_source(d.eval_data, d.encoding or src.encoding)
        tokens = read_units(esrc, esrc.units)
        ids: list[str] = []
        origin, where = d.eval_data, "(data.eval_data in the config)"
    else:
        kept = corpus_eval_path(src)
        corpus = kept.parent.parent.parent if kept is not None else None
        if kept is not None and kept.is_file():
            table = pq.read_table(kept)
            ids = [str(i) for i in table.column("ids")[0].as_py()]
            tokens = table.column("input_ids")[0].values.to_numpy().astype(np.int64)
            origin = str(kept)
            where = f"(the corpus's eval set: every version under {corpus} is judged on it)"
        else:
            ids, tokens = held_out(src, d.eval_fraction, d.eval_max_docs)
            held_here = True
            origin = f"held out of {src.uri} (fraction {d.eval_fraction})"
            where = "(held out of this data, never trained on; the same documents every run)"
            if kept is not None and ids:
                where = f"(chosen now as the eval set of every version under {corpus})"
                origin = str(kept)
                if master:
                    try:
                        _write_eval(kept, ids, tokens)
                    except OSError as e:  # a read-only corpus: the run keeps its own copy
                        kept = out / f"eval-{src.encoding}.parquet"
                        _write_eval(kept, ids, tokens)
                        origin = str(kept)
                        where = f"(kept in the run: {corpus} is not writable, {e.strerror})"
    if tokens.size and tokens.max() >= src.n_vocab:
        raise DataError(f"{origin}: eval token ids outside the vocabulary ({src.n_vocab})")
    sha = _sha256_bytes(tokens.astype(np.int64).tobytes())
    return {
        "ids": frozenset(ids),
        "tokens": tokens,
        "origin": origin,
        "sha256": sha,
        "where": where,
        "held_out_here": held_here,
    }


def _write_eval(path: Path, ids: list[str], tokens: np.ndarray) -> None:
    # One row: the held-out document ids and their tokens in order.
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.table(
        {
            "ids": pa.array([ids], pa.list_(pa.string())),
            "input_ids": pa.array([tokens.tolist()], pa.list_(pa.uint32())),
        }
    )
    write_table_atomically(table, path, compression="snappy")


MAX_PASSES = 4.0  # above this many passes over the data, the header warns


def _n(count: int, noun: str) -> str:
    return f"{count:,} {noun}{'' if count == 1 else 's'}"


def _short(count: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if count >= size:
            return f"{count / size:.1f}{unit}"
    return f"{count:.0f}"


def plan(run: Run) -> tuple[list[str], dict[str, Any]]:
    """What the run will do, before its first step: the header's lines, and the same figures
    for run.json. Passes over the data are the config's tokens (max_steps x tokens per step)
    over the data's tokens, less the eval set when it was held out of them."""
    t, src, ev, dd, m = run.cfg.train, run.src, run.ev, run.dd, run.mcfg
    model = run.raw_model
    params = model.num_params(non_embedding=False)
    embed = model.embed.weight.numel()
    head = sum(p.numel() for p in model.lm_head.parameters())
    per_step = t.batch_size * t.seq_len * t.grad_accum * dd.world
    eval_tokens = int(ev["tokens"].size)
    train_tokens = max(1, src.tokens - (eval_tokens if ev["held_out_here"] else 0))
    passes = t.max_steps * per_step / train_tokens
    config = run.config_path or "none: the built-in defaults"
    precision = "bf16" if run.use_bf16 else "fp32"
    if run.device.type == "cuda":
        speed = "tokens/s and MFU" if device_peak(run.device) else "tokens/s (GPU peak unknown)"
        device = f"{torch.cuda.get_device_name(run.device)}, {precision}"
    else:  # a measured CPU peak swings with a shared machine's load: no MFU
        speed = "tokens/s (no MFU on CPU)"
        device = f"cpu, {precision}, {_n(torch.get_num_threads(), 'thread')}"
    procs = f" x {_n(dd.world, 'process')}" if dd.world > 1 else ""
    eval_docs = f"{_n(len(ev['ids']), 'document')}, " if ev["ids"] else ""
    lines = [
        f"config   {config}",
        f"model    {_short(params)} parameters: {m.n_layer} layers x {m.n_embd}, {m.n_head} "
        f"heads ({_short(params - embed - head)} in the blocks, {_short(embed)} embedding, "
        f"{_short(head)} head for {m.vocab_size:,} ids)",
        f"data     {src.uri} ({src.kind}, {src.encoding or 'unnamed encoding'}): "
        f"{_n(src.tokens, 'token')} in {_n(src.n_rows, 'document')}",
        f"eval     {eval_docs}{_n(eval_tokens, 'token')}: {ev['origin']}",
        f"         {ev['where']}",
        f"steps    {t.max_steps:,} x {per_step:,} tokens (batch {t.batch_size} x seq {t.seq_len} "
        f"x accum {t.grad_accum}{procs}) = {t.max_steps * per_step:,} tokens",
        f"passes   {passes:.1f} over the {train_tokens:,} training tokens",
        f"writes   {run.out}/: step-NNNNNN/, latest/, metrics.jsonl, loss.png, run.json",
        f"device   {device}; progress in {speed}",
    ]
    if passes > MAX_PASSES:
        steps = max(1, int(MAX_PASSES * train_tokens // per_step))
        lines.append(
            f"warning: {passes:.1f} passes over the data, more than {MAX_PASSES:g}: repeated "
            f"tokens stop helping and the model memorises them; train.max_steps {steps:,} "
            f"makes {MAX_PASSES:g} passes (--max-steps {steps}), or bring more data"
        )
    if run.resumed:
        lines.append(f"resumes  at step {run.step:,} from {run.out / 'latest'}")
    facts = {
        "config": str(config),
        "parameters": params,
        "embedding_parameters": embed,
        "head_parameters": head,
        "data_tokens": src.tokens,
        "data_documents": src.n_rows,
        "eval_documents": len(ev["ids"]),
        "eval_tokens": eval_tokens,
        "eval_where": ev["where"],
        "train_tokens": train_tokens,
        "tokens_per_step": per_step,
        "max_steps": t.max_steps,
        "passes": passes,
        "passes_warning": passes > MAX_PASSES,
        "out": str(run.out),
    }
    return lines, facts


class Metrics:
    """metrics.jsonl (every record) and loss.png, written by rank 0."""

    def __init__(self, out: Path, enabled: bool, resume_step: int | None) -> None:
        self.path, self.enabled = out / "metrics.jsonl", enabled
        self.records: list[dict[str, Any]] = []
        if self.path.exists() and resume_step is None and enabled:
            self.path.unlink()  # a fresh run in a reused directory starts a fresh log
        if self.path.exists():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                r = json.loads(line)
                if resume_step is not None and r["step"] <= resume_step:
                    self.records.append(r)
            if enabled:  # drop what was logged after the checkpoint we resume from
                self.path.write_text("".join(json.dumps(r) + "\n" for r in self.records))

    def log(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        if self.enabled:
            with self.path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")

    def plot(self) -> None:
        if not self.enabled:
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        train = [r for r in self.records if r["kind"] == "train"]
        evals = [r for r in self.records if r["kind"] == "eval"]
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot([r["tokens"] for r in train], [r["loss"] for r in train], label="train")
        if evals:
            ax.plot(
                [r["tokens"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="eval"
            )
        ax.set_xlabel("tokens seen")
        ax.set_ylabel("cross-entropy (nats)")
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(self.path.parent / "loss.png", dpi=100)
        plt.close(fig)


def _batches(loader: DataLoader, states: dict[int, dict[str, Any]]) -> Iterator[torch.Tensor]:
    """Windows from the loader; records each stream's newest position in `states`."""
    for windows, stream, state in loader:
        states[stream] = state
        yield windows


@dataclass
class Run:
    """What one training run carries from step to step (the loop's state, in one place)."""

    cfg: TrainConfig
    data: str
    out: Path
    dd: Dist
    device: torch.device
    src: TokenSource
    mcfg: ModelConfig
    ev: dict[str, Any]  # the reference eval set: ids, tokens, sha256, origin
    raw_model: Phi
    optimizer: torch.optim.Optimizer
    use_bf16: bool
    step: int = 0
    tokens_seen: int = 0
    loader_states: dict[int, dict[str, Any]] = field(default_factory=dict)
    batches_done: int = 0
    resumed: bool = False
    config_path: str | None = None  # the YAML the config came from, for the header

    @property
    def fused_loss(self) -> bool:
        # The chunked fused loss computes its gradients in fp32; under bf16 autocast the plain
        # loss (fused by torch.compile) is the better choice.
        return not self.use_bf16

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.use_bf16:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()


def setup(cfg: TrainConfig, data: str, out: Path) -> Run:
    """The data, the reference eval set, the model and its optimizer."""
    dd, device = setup_distributed()
    t = cfg.train
    out.mkdir(parents=True, exist_ok=True)
    src = open_source(data, cfg.data.encoding)
    mcfg = ModelConfig(**cfg.model.model_dump(), vocab_size=padded_vocab(src.n_vocab))
    ev = reference_eval(src, cfg, out, dd.master)
    torch.manual_seed(t.seed + dd.rank)
    raw_model = Phi(mcfg).to(device)
    use_bf16 = t.dtype == "bfloat16" or (t.dtype == "auto" and device.type == "cuda")
    optimizer = torch.optim.AdamW(
        raw_model.optim_groups(t.weight_decay), lr=t.lr, betas=(t.beta1, t.beta2), fused=True
    )
    return Run(cfg, data, out, dd, device, src, mcfg, ev, raw_model, optimizer, use_bf16)


def resume(run: Run, log: Callable[[str], None]) -> None:
    """Continue from OUT/latest when it exists: weights, optimizer, step, loader, RNG."""
    path = run.out / "latest"
    if not path.exists():
        return
    _check_resume(checkpoint.read_meta(path), run.mcfg, run.cfg, run.dd, path)
    state, _ = checkpoint.load_model_state(path)
    run.raw_model.load_state_dict(state)
    ts = checkpoint.load_train_state(path)
    run.optimizer.load_state_dict(ts["optimizer"])
    run.step, run.tokens_seen = ts["step"], ts["tokens_seen"]
    run.loader_states = {int(k): v for k, v in ts["loader"]["streams"].items()}
    run.batches_done = ts["loader"]["batches"]
    torch.set_rng_state(ts["rng"][run.dd.rank])
    run.resumed = True
    log(f"resumed from {path} at step {run.step}")


def wrap(run: Run) -> Any:
    """The model the steps call: compiled and/or wrapped in DDP as the config asks."""
    model: Any = run.raw_model
    if run.cfg.train.compile:
        model = torch.compile(model)
    if run.dd.world > 1:
        ids = [run.dd.local_rank] if run.device.type == "cuda" else None
        model = DDP(model, device_ids=ids)
    return model


def make_loader(run: Run) -> DataLoader:
    """Windows of the token shards, continuing where a resumed run's loader stopped."""
    t, n_workers = run.cfg.train, run.cfg.data.num_workers
    dataset = TokenWindows(
        run.src,
        t.seq_len,
        seed=t.seed,
        rank=run.dd.rank,
        world_size=run.dd.world,
        shuffle_block=run.cfg.data.shuffle_block,
        exclude=run.ev["ids"],
        states=run.loader_states,
        worker_offset=run.batches_done % max(1, n_workers),
    )
    return DataLoader(
        dataset,
        batch_size=t.batch_size,
        num_workers=n_workers,
        collate_fn=collate,
        pin_memory=run.device.type == "cuda",
        prefetch_factor=4 if n_workers else None,
    )


def train_step(run: Run, model: Any, batches: Iterator[torch.Tensor], lr: float) -> Any:
    """One optimizer step over `grad_accum` micro-batches; returns the summed loss (a tensor on
    the device: reading it would wait for the GPU, so only the steps that log do)."""
    t = run.cfg.train
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    loss_sum: Any = 0.0
    for micro in range(t.grad_accum):
        w = next(batches).to(run.device, non_blocking=True)
        run.batches_done += 1
        sync = micro == t.grad_accum - 1 or run.dd.world == 1
        ctx = model.no_sync() if not sync else contextlib.nullcontext()
        with ctx, run.autocast():
            loss = model(w[:, :-1], w[:, 1:], fused_loss=run.fused_loss) / t.grad_accum
        loss.backward()
        loss_sum += loss.detach()
    if t.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.step += 1
    run.tokens_seen += t.batch_size * t.seq_len * t.grad_accum * run.dd.world
    return loss_sum


def evaluate(run: Run, windows: torch.Tensor) -> float:
    """Mean loss on the reference eval set."""
    bs = run.cfg.train.batch_size
    run.raw_model.eval()
    total, n = 0.0, 0
    with torch.no_grad(), run.autocast():
        for i in range(0, windows.shape[0], bs):
            w = windows[i : i + bs].to(run.device)
            total += float(run.raw_model(w[:, :-1], w[:, 1:], fused_loss=run.fused_loss)) * len(w)
            n += w.shape[0]
    run.raw_model.train()
    return total / n


def save(run: Run, metrics: Metrics, log: Callable[[str], None]) -> Path | None:
    """A checkpoint with the loader's position and every rank's RNG (written by rank 0)."""
    streams = _gather(run.loader_states, run.dd)
    rng = _gather_list(torch.get_rng_state(), run.dd)
    if not run.dd.master:
        return None
    ts = {
        "optimizer": run.optimizer.state_dict(),
        "step": run.step,
        "tokens_seen": run.tokens_seen,
        "loader": {"streams": streams, "batches": run.batches_done},
        "rng": rng,
    }
    meta = {
        "model": run.mcfg.to_dict(),
        "config": run.cfg.model_dump(),
        "data": run.data,
        "encoding": run.src.encoding,
        "n_vocab": run.src.n_vocab,
        "eot_token": run.src.eot_token,
        "world_size": run.dd.world,
        "num_workers": run.cfg.data.num_workers,
        "tokens_seen": run.tokens_seen,
        "eval_sha256": run.ev["sha256"],
    }
    path = checkpoint.save(run.out, run.step, run.raw_model.state_dict(), ts, meta)
    metrics.plot()
    log(f"checkpoint {path}")
    return path


def announce(
    run: Run, cfg: TrainConfig, data: str, out: Path, log: Callable[[str], None]
) -> dict[str, Any]:
    """The header before the first step, and run.json; returns the header's figures."""
    header, facts = plan(run)
    if run.dd.master:
        for line in header:
            log(line)
        _write_run_info(out, cfg, data, run.src, run.mcfg, run.ev, run.dd, facts)
    return facts


def log_train(
    run: Run, metrics: Metrics, log: Callable[[str], None], loss: float, lr: float,
    tps: float, mfu: float | None,
) -> float:  # fmt: skip
    """One progress line and metrics row (MFU only where the device's peak is known)."""
    metrics.log({"kind": "train", "step": run.step, "tokens": run.tokens_seen, "loss": loss,
                 "lr": lr, "tok_per_s": tps, "mfu": mfu})  # fmt: skip
    mfu_s = f" | mfu {100 * mfu:.1f}%" if mfu is not None else ""
    log(f"step {run.step} | loss {loss:.4f} | lr {lr:.2e} | {tps:,.0f} tok/s{mfu_s}")
    return loss


def train(
    cfg: TrainConfig,
    data: str,
    out: Path,
    *,
    stop_after: int | None = None,
    log: Callable[[str], None] = print,
    config_path: str | Path | None = None,
) -> dict[str, Any]:
    """Train (or resume from OUT/latest) until train.max_steps, or `stop_after` steps, or
    SIGTERM; returns a summary (steps, last losses, checkpoint path, the header's figures).
    `config_path` names the config's file in the header."""
    t = cfg.train
    run = setup(cfg, data, out)
    run.config_path = str(config_path) if config_path else None
    ev_windows = eval_windows(run.ev["tokens"], t.seq_len, t.eval_batches * t.batch_size)
    resume(run, log)
    dd = run.dd
    metrics = Metrics(out, dd.master, run.step if run.resumed else None)
    facts = announce(run, cfg, data, out, log)
    model = wrap(run)
    loader = make_loader(run)
    batches = _batches(loader, run.loader_states)

    stop = {"flag": False}
    # Signal handlers can only be set from the main thread (a Prefect task may run elsewhere).
    main_thread = threading.current_thread() is threading.main_thread()
    if main_thread:
        old_handler = signal.signal(signal.SIGTERM, lambda *_: stop.update(flag=True))
    peak = device_peak(run.device)
    flops_tok = run.raw_model.flops_per_token(t.seq_len)
    tokens_per_step = t.batch_size * t.seq_len * t.grad_accum * dd.world
    end = t.max_steps if stop_after is None else min(t.max_steps, run.step + stop_after)
    last_ckpt: Path | None = None
    losses: list[float] = []
    t0, steps_timed = time.perf_counter(), 0

    model.train()
    try:
        while run.step < end:
            lr = lr_at(run.step, cfg)
            loss_sum = train_step(run, model, batches, lr)
            step, steps_timed = run.step, steps_timed + 1
            if step % t.log_every == 0 or step == end:
                tps = tokens_per_step * steps_timed / (time.perf_counter() - t0)
                mfu = flops_tok * tps / (peak * dd.world) if peak else None
                loss = _mean(float(loss_sum), dd)
                losses.append(log_train(run, metrics, log, loss, lr, tps, mfu))
                t0, steps_timed = time.perf_counter(), 0
            if (t.eval_every and step % t.eval_every == 0) or step == end:
                el = evaluate(run, ev_windows)
                metrics.log(
                    {"kind": "eval", "step": step, "tokens": run.tokens_seen, "eval_loss": el}
                )
                log(f"step {step} | eval loss {el:.4f}")
            if _any(stop["flag"], dd):
                log(f"SIGTERM: checkpointing at step {step}")
                last_ckpt = save(run, metrics, log)
                break
            if (t.ckpt_every and step % t.ckpt_every == 0) or step == end:
                last_ckpt = save(run, metrics, log)
            if steps_timed == 0:  # eval and checkpoints do not count against tokens/s
                t0 = time.perf_counter()
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, old_handler)
        del batches, loader
        free_workspace()
    return {
        "step": run.step,
        "tokens_seen": run.tokens_seen,
        "losses": losses,
        "checkpoint": str(last_ckpt) if last_ckpt else None,
        "interrupted": stop["flag"],
        "rank": dd.rank,
        "plan": facts,
    }


def _check_resume(
    meta: dict[str, Any], mcfg: ModelConfig, cfg: TrainConfig, dd: Dist, path: Path
) -> None:
    if meta["model"] != mcfg.to_dict():
        raise checkpoint.CheckpointError(
            f"{path}: the checkpoint's model ({meta['model']}) differs from the config's "
            "(model section or the dataset's vocabulary); use another --out"
        )
    old, new = meta.get("config", {}).get("train", {}), cfg.train.model_dump()
    for key in ("seq_len", "batch_size", "grad_accum", "seed"):
        if old.get(key) != new[key]:
            raise checkpoint.CheckpointError(
                f"{path}: train.{key} was {old.get(key)} when checkpointed, now {new[key]}: "
                "an exact resume needs the same value"
            )
    for key, now in (("world_size", dd.world), ("num_workers", cfg.data.num_workers)):
        if meta.get(key) != now:
            raise checkpoint.CheckpointError(
                f"{path}: checkpointed with {key}={meta.get(key)}, now {now}: "
                "an exact resume needs the same value"
            )


def _write_run_info(
    out: Path,
    cfg: TrainConfig,
    data: str,
    src: TokenSource,
    mcfg: ModelConfig,
    ev: dict,
    dd: Dist,
    facts: dict[str, Any],
) -> None:
    info = {
        "data": data,
        "encoding": src.encoding,
        "n_vocab": src.n_vocab,
        "model": mcfg.to_dict(),
        "params": Phi.__name__,
        "config": cfg.model_dump(),
        "world_size": dd.world,
        "eval": {"origin": ev["origin"], "sha256": ev["sha256"], "tokens": int(ev["tokens"].size)},
        "plan": facts,
    }
    (out / "run.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")


def _mean(x: float, dd: Dist) -> float:
    if dd.world == 1:
        return x
    t = torch.tensor([x], dtype=torch.float64, device=dd.device)
    dist.all_reduce(t)
    return float(t.item()) / dd.world


def _any(flag: bool, dd: Dist) -> bool:
    if dd.world == 1:
        return flag
    t = torch.tensor([int(flag)], device=dd.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def _gather(states: dict[int, dict[str, Any]], dd: Dist) -> dict[int, dict[str, Any]]:
    if dd.world == 1:
        return dict(states)
    parts: list[Any] = [None] * dd.world
    dist.all_gather_object(parts, states)
    merged: dict[int, dict[str, Any]] = {}
    for p in parts:
        merged.update(p)
    return merged


def _gather_list(x: torch.Tensor, dd: Dist) -> list[torch.Tensor]:
    if dd.world == 1:
        return [x]
    parts: list[Any] = [None] * dd.world
    dist.all_gather_object(parts, x)
    return parts
