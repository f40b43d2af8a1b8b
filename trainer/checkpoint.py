"""Checkpoints: `OUT/step-NNNNNN/` with model.pt, train_state.pt and meta.json; the newest is also
`OUT/latest/` (hard links, so no second copy on disk).

meta.json holds the model config, the data it trained on, and the sha256 of model.pt, so a
corrupt or truncated checkpoint is refused with a clear message instead of a pickle traceback.
A checkpoint directory is written under a temporary name and renamed: a crash leaves the
previous checkpoint intact.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from booksmith.shards.files import file_sha256
from booksmith.trainer.model import ModelConfig, Phi

MODEL, STATE, META = "model.pt", "train_state.pt", "meta.json"


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupt, or does not fit the run; names the directory."""


def save(out: Path, step: int, model_state: dict, train_state: dict, meta: dict[str, Any]) -> Path:
    """Write OUT/step-NNNNNN/ and point OUT/latest/ at it; returns the step directory."""
    final = out / f"step-{step:06d}"
    tmp = out / f".tmp-step-{step:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    torch.save(model_state, tmp / MODEL)
    torch.save(train_state, tmp / STATE)
    meta = {**meta, "step": step, "model_sha256": file_sha256(tmp / MODEL)}
    (tmp / META).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    latest_tmp, latest = out / ".tmp-latest", out / "latest"
    shutil.rmtree(latest_tmp, ignore_errors=True)
    latest_tmp.mkdir()
    for name in (MODEL, STATE, META):
        os.link(final / name, latest_tmp / name)
    old = out / ".old-latest"
    shutil.rmtree(old, ignore_errors=True)
    if latest.exists():
        os.replace(latest, old)
    os.replace(latest_tmp, latest)
    shutil.rmtree(old, ignore_errors=True)
    return final


def read_meta(ckpt: Path) -> dict[str, Any]:
    path = ckpt / META
    if not ckpt.is_dir():
        raise CheckpointError(f"{ckpt}: no such checkpoint directory")
    try:
        meta: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{ckpt}: not a checkpoint (no {META})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: corrupt checkpoint metadata: {e}") from None
    if "model" not in meta or "model_sha256" not in meta:
        raise CheckpointError(f"{path}: not a booksmith checkpoint (no model config)")
    return meta


def _load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing from the checkpoint") from None
    except Exception as e:  # torch raises many kinds for a damaged zip/pickle
        raise CheckpointError(f"{path}: corrupt checkpoint file: {e}") from None


def load_model_state(ckpt: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    meta = read_meta(ckpt)
    path = ckpt / MODEL
    if not path.is_file():
        raise CheckpointError(f"{path}: missing from the checkpoint")
    if file_sha256(path) != meta["model_sha256"]:
        raise CheckpointError(f"{path}: checksum mismatch (corrupt or truncated checkpoint)")
    return _load(path), meta


def load_model(ckpt: Path) -> tuple[Phi, dict[str, Any]]:
    """The model of a checkpoint (CPU, eval mode) and its meta.json."""
    state, meta = load_model_state(ckpt)
    fields = {k: v for k, v in meta["model"].items() if k != "extra"}  # a field older runs had
    model = Phi(ModelConfig(**fields))
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise CheckpointError(f"{ckpt}: weights do not fit its model config: {first}") from None
    return model.eval(), meta


def load_train_state(ckpt: Path) -> dict[str, Any]:
    state: dict[str, Any] = _load(ckpt / STATE)
    return state
