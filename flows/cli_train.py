"""`booksmith train`: train the bundled Phi model, export checkpoints, compare runs.

booksmith train --data DATASET --config trainer/configs/tiny.yaml --out DIR [--max-steps N]
booksmith train export CKPT DIR
booksmith train compare RUN...
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from booksmith.flows.cli_errors import fail, user_errors

app = typer.Typer(
    help="Train the bundled Phi-style model on token shards.",
    invoke_without_command=True,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)


def _trainer_errors() -> tuple[type[Exception], ...]:
    from booksmith.trainer.checkpoint import CheckpointError
    from booksmith.trainer.data import DataError

    return (CheckpointError, DataError)


@app.callback()
def train(
    ctx: typer.Context,
    data: Annotated[
        str | None, typer.Option(help="Dataset version, shard directory, glob or URL.")
    ] = None,
    config: Annotated[
        str | None,
        typer.Option(help="Trainer YAML, or a bundled config: tiny, small, phi-1_5, phi-2."),
    ] = None,
    out: Annotated[Path | None, typer.Option(help="Run directory; resumes from latest/.")] = None,
    max_steps: Annotated[int | None, typer.Option(help="Override train.max_steps.", min=1)] = None,
    nproc_per_node: Annotated[
        int, typer.Option(help="Processes (GPUs) on this machine: >1 runs DDP via torchrun.")
    ] = 1,
) -> None:
    """Train on DATA; checkpoints in OUT/step-NNNNNN/, the newest also in OUT/latest/."""
    if ctx.invoked_subcommand is not None:
        return
    if data is None or out is None:
        fail("booksmith train needs --data and --out (see --help)")
        return
    from booksmith.shards.reachable import readable, writable_dir
    from booksmith.trainer.config import config_path, load_train_config

    try:
        path = config_path(config)  # no --config: one line listing the bundled configs
        cfg = load_train_config(path, {"train.max_steps": max_steps})
        if problems := [*readable(data, "--data"), *writable_dir(out, "--out")]:
            fail("\n".join(problems))  # before torch starts, every problem at once
        if nproc_per_node > 1:
            cmd = [
                sys.executable, "-m", "torch.distributed.run", "--standalone",
                f"--nproc_per_node={nproc_per_node}", "-m", "booksmith.trainer",
                "--data", data, "--out", str(out),
            ]  # fmt: skip
            cmd += ["--config", str(path)]
            cmd += ["--max-steps", str(max_steps)] if max_steps else []
            rc = subprocess.run(cmd, env=os.environ.copy()).returncode
            if rc:
                raise typer.Exit(rc)
            print(out / "latest")
            return
        from booksmith.trainer.train import train as run_training

        summary = run_training(
            cfg, data, out, log=lambda m: console.print(m, highlight=False), config_path=path
        )
    except user_errors(*_trainer_errors()) as e:
        fail(str(e))
        return
    print(summary["checkpoint"] or out)  # stdout: the newest checkpoint, for scripts


@app.command("export")
def export(
    ckpt: Annotated[Path, typer.Argument(help="A checkpoint directory (OUT/latest, step-N).")],
    out_dir: Annotated[Path, typer.Argument(help="Directory to write the Hugging Face model.")],
    encoding: Annotated[
        str | None, typer.Option(help="The tokenizer's encoding (default: the checkpoint's).")
    ] = None,
    no_tokenizer: Annotated[
        bool, typer.Option("--no-tokenizer", help="Write the weights and configs alone.")
    ] = False,
) -> None:
    """Write a model transformers loads and runs: config.json, model.safetensors,
    generation_config.json and the tokenizer of the encoding it trained on."""
    from booksmith.shards.hf_tokenizer import TokenizerExportError
    from booksmith.trainer.export import export_hf

    try:
        path = export_hf(ckpt, out_dir, encoding=encoding, tokenizer=not no_tokenizer)
    except user_errors(*_trainer_errors(), TokenizerExportError) as e:
        fail(str(e))
        return
    print(path)


@app.command("compare")
def compare(
    runs: Annotated[list[Path], typer.Argument(help="Training run directories.")],
) -> None:
    """Eval loss by tokens seen across runs, on their shared reference eval set."""
    from booksmith.trainer.compare import compare_runs

    try:
        c = compare_runs(runs)
    except (FileNotFoundError, ValueError, KeyError) as e:
        fail(str(e))
        return
    table = Table(title="eval loss by tokens seen")
    table.add_column("tokens", justify="right")
    for run, data in zip(c.runs, c.data, strict=True):
        table.add_column(f"{run}\n[dim]{data}[/dim]", justify="right")
    for t in c.tokens:
        table.add_row(f"{t:,}", *(f"{v:.4f}" if v is not None else "-" for v in c.loss[t]))
    table.add_row("final", *(f"{v:.4f}" if v is not None else "-" for v in c.final), style="bold")
    Console(width=200).print(table)
    for w in c.warnings:
        console.print(f"[yellow]warning:[/yellow] {w}")
