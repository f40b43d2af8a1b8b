"""The Prefect `train` flow: train the bundled Phi model on a dataset version.

One process in-process by default; `nproc_per_node > 1` launches torchrun (DDP). The nightly
flow calls `train_flow` after writing a version when its config asks for it.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from booksmith.shards.reachable import readable, writable_dir


@task(cache_policy=NO_CACHE)
def train_model(
    data: str, config: str | None, out: str, max_steps: int | None, nproc_per_node: int
) -> dict[str, Any]:
    from booksmith.trainer.config import config_path, load_train_config
    from booksmith.trainer.train import train

    # no config: the tiny one, as the nightly's train.config documents (the header names it)
    path = config_path(config or "tiny")
    cfg = load_train_config(path, {"train.max_steps": max_steps})
    if nproc_per_node <= 1:
        return train(cfg, data, Path(out), config_path=path)
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc_per_node={nproc_per_node}", "-m", "booksmith.trainer",
        "--data", data, "--out", out,
    ]  # fmt: skip
    cmd += ["--config", str(path)]
    if max_steps:
        cmd += ["--max-steps", str(max_steps)]
    subprocess.run(cmd, check=True)
    return {"checkpoint": str(Path(out) / "latest"), "nproc_per_node": nproc_per_node}


@flow(name="booksmith-train", log_prints=True)
def train_flow(
    data: str,
    config: str | None = None,
    out: str = "runs/train",
    max_steps: int | None = None,
    nproc_per_node: int = 1,
) -> dict[str, Any]:
    """Train on `data` (a dataset version, shard directory or URL); checkpoints under `out`."""
    if problems := [*readable(data, "data"), *writable_dir(Path(out), "out")]:
        raise ValueError("\n".join(problems))  # the flow run's state message says what to fix
    return train_model(data, config, out, max_steps, nproc_per_node)
