"""The CLI tunes glibc's malloc (two arenas, a fixed mmap threshold) and puts Arrow on the
system allocator before any thread starts (flows/malloc.py), for itself and the processes it
starts; a user's own setting is left alone."""

from __future__ import annotations

import os
import subprocess
import sys

NAMES = ("MALLOC_ARENA_MAX", "MALLOC_MMAP_THRESHOLD_", "ARROW_DEFAULT_MEMORY_POOL")
SEEN = (
    "import os; from booksmith.flows import cli; "
    "import pyarrow as pa; "
    f"cli.app = lambda **k: print(*[os.environ.get(n) for n in {NAMES!r}], "
    "pa.default_memory_pool().backend_name); cli.main()"
)


def _seen(env: dict[str, str]) -> list[str]:
    done = subprocess.run(
        [sys.executable, "-c", SEEN], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


def test_the_cli_tunes_allocators_unless_the_user_set_them() -> None:
    env = {k: v for k, v in os.environ.items() if k not in NAMES}
    assert _seen(env) == ["2", "131072", "system", "system"]
    mine = {"MALLOC_ARENA_MAX": "6", "MALLOC_MMAP_THRESHOLD_": "65536"}
    mine["ARROW_DEFAULT_MEMORY_POOL"] = "mimalloc"
    assert _seen({**env, **mine}) == ["6", "65536", "mimalloc", "mimalloc"]
