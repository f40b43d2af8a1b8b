"""`python -m booksmith.trainer` (or under torchrun: `-m booksmith.trainer`): see train.py."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from booksmith.schemas.config import ConfigError
from booksmith.trainer.checkpoint import CheckpointError
from booksmith.trainer.config import config_path, load_train_config
from booksmith.trainer.data import DataError
from booksmith.trainer.train import train


def _shutdown_process_group() -> None:
    """Tear DDP down before the interpreter exits: gloo's threads still running at exit abort
    the process ("terminate called without an active exception") after a good run."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m booksmith.trainer", description=__doc__)
    p.add_argument("--data", required=True, help="dataset version, directory, glob or URL")
    p.add_argument(
        "--config",
        default=None,
        help="trainer YAML, or a bundled config: tiny, small, phi-1_5, ...",
    )
    p.add_argument("--out", type=Path, required=True, help="run directory (resumes from latest/)")
    p.add_argument("--max-steps", type=int, default=None, help="override train.max_steps")
    args = p.parse_args(argv)
    try:
        path = config_path(args.config)  # no --config: an error listing the bundled configs
        cfg = load_train_config(path, {"train.max_steps": args.max_steps})
        summary = train(cfg, args.data, args.out, config_path=path)
    except (ConfigError, DataError, CheckpointError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        _shutdown_process_group()
    if summary["rank"] == 0:
        print(f"done: step {summary['step']}, checkpoint {summary['checkpoint']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
