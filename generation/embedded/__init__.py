"""The embedded LLM backend: SmolLM2-135M-Instruct on llama.cpp behind an OpenAI-compatible API."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from generation.embedded.launcher import EmbeddedServer
    from generation.embedded.model import bundled_gguf, prepared_model

__all__ = ["EmbeddedServer", "bundled_gguf", "prepared_model"]

_HOMES = {
    "EmbeddedServer": "generation.embedded.launcher",
    "bundled_gguf": "generation.embedded.model",
    "prepared_model": "generation.embedded.model",
}


def __getattr__(name: str) -> Any:
    # Lazy, so `python -m generation.embedded.model` does not import itself twice.
    if name in _HOMES:
        return getattr(importlib.import_module(_HOMES[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
