"""The trainer's YAML config (trainer/configs/*.yaml): model shape, optimisation, data, logging.

Every key has a default; unknown keys are errors that name the file, line and key. The
vocabulary is not configured: it comes from the token shards' encoding, padded to 64.

The commands that train (`booksmith train`, `python -m booksmith.trainer`) need a config:
a YAML path, or a bundled config by name (`tiny`, `small`, `phi-1_5`, `phi-2`). Without one
they stop and list the bundled configs: the model's size sets the cost by orders of magnitude
(tiny trains in seconds on a CPU, phi-2 needs GPUs), so no default is safe to take silently.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from booksmith.schemas.config import ConfigError, load_yaml_model

CONFIG_DIR = Path(__file__).parent / "configs"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSection(_Strict):
    n_layer: int = Field(2, ge=1)
    n_head: int = Field(4, ge=1)
    n_embd: int = Field(64, ge=8)
    intermediate_size: int = Field(0, ge=0, description="0 means 4 * n_embd")
    rotary_pct: float = Field(0.5, gt=0, le=1)
    rope_theta: float = 10000.0
    qk_layernorm: bool = False
    max_seq_len: int = Field(2048, ge=8)
    embd_pdrop: float = Field(0.0, ge=0, lt=1)
    attn_pdrop: float = Field(0.0, ge=0, lt=1)
    resid_pdrop: float = Field(0.0, ge=0, lt=1)


class TrainSection(_Strict):
    seq_len: int = Field(32, ge=2)
    batch_size: int = Field(8, ge=1, description="micro-batch per rank")
    grad_accum: int = Field(1, ge=1)
    max_steps: int = Field(200, ge=1)
    lr: float = Field(3e-3, gt=0)
    min_lr: float = Field(3e-4, ge=0)
    warmup_steps: int = Field(20, ge=0)
    weight_decay: float = Field(0.1, ge=0)
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = Field(1.0, ge=0, description="0 disables clipping")
    seed: int = 1337
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # auto: bf16 on CUDA, fp32 on CPU
    compile: bool = False
    eval_every: int = Field(50, ge=0, description="0: only at the end")
    eval_batches: int = Field(8, ge=1)
    ckpt_every: int = Field(100, ge=0, description="0: only at the end and on SIGTERM")
    log_every: int = Field(10, ge=1)


class DataSection(_Strict):
    encoding: str | None = None  # None: the dataset's only encoding
    num_workers: int = Field(0, ge=0)
    shuffle_block: int = Field(8, ge=1, description="row groups shuffled together")
    eval_fraction: float = Field(0.01, ge=0, lt=1, description="documents held out for eval")
    eval_max_docs: int = Field(512, ge=1)
    eval_data: str | None = None  # token shards to evaluate on instead of a held-out slice


class TrainConfig(_Strict):
    model: ModelSection = ModelSection()
    train: TrainSection = TrainSection()
    data: DataSection = DataSection()


def bundled_configs() -> dict[str, str]:
    """The bundled configs by name, smallest first, each with its model's shape."""
    shapes: list[tuple[int, str, str]] = []
    for path in CONFIG_DIR.glob("*.yaml"):
        m = load_yaml_model(TrainConfig, path, None, what="trainer config").model
        shapes.append((m.n_layer * m.n_embd**2, path.stem, f"{m.n_layer} layers x {m.n_embd}"))
    return {name: shape for _, name, shape in sorted(shapes)}


def config_path(value: str | Path | None) -> Path:
    """A trainer config's file: a path, or a bundled config's name. None is a ConfigError that
    lists the bundled configs (a missing --config never trains a model nobody chose)."""
    if value is None:
        choices = ", ".join(f"{n} ({shape})" for n, shape in bundled_configs().items())
        raise ConfigError(
            "no trainer config: pass --config with a YAML file or a bundled config's name, "
            f"e.g. --config tiny. Bundled: {choices}"
        )
    path = Path(value)
    if not path.exists() and path.suffix == "" and (CONFIG_DIR / f"{value}.yaml").is_file():
        return CONFIG_DIR / f"{value}.yaml"
    return path


def load_train_config(
    path: Path | str | None, overrides: dict[str, Any] | None = None
) -> TrainConfig:
    """Read and validate a trainer YAML (a path or a bundled config's name; None: the built-in
    defaults, for library callers); `overrides` are dotted keys (e.g. train.max_steps)."""
    if path is not None:
        path = config_path(path)
    source = str(path) if path else "<defaults>"
    cfg = load_yaml_model(TrainConfig, path, overrides, what="trainer config")
    if cfg.train.seq_len > cfg.model.max_seq_len:
        raise ConfigError(
            f"{source}: train.seq_len {cfg.train.seq_len} exceeds model.max_seq_len "
            f"{cfg.model.max_seq_len}"
        )
    if cfg.model.n_embd % cfg.model.n_head:
        raise ConfigError(f"{source}: model.n_embd must be a multiple of model.n_head")
    return cfg
