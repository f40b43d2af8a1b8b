"""The embedded LLM backend: SmolLM2-135M-Instruct on llama.cpp behind an OpenAI-compatible API."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from booksmith.generation.embedded.launcher import EmbeddedServer
    from booksmith.generation.embedded.model import bundled_gguf, prepared_model

__all__ = ["EmbeddedServer", "bundled_gguf", "prepared_model"]

_HOMES = {
    "EmbeddedServer": "booksmith.generation.embedded.launcher",
    "bundled_gguf": "booksmith.generation.embedded.model",
    "prepared_model": "booksmith.generation.embedded.model",
}


def __getattr__(name: str) -> Any:
    # Lazy, so `python -m booksmith.generation.embedded.model` does not import itself twice.
    if name in _HOMES:
        return getattr(importlib.import_module(_HOMES[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
