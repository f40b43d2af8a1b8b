"""The CLI caps glibc's malloc arenas before any thread starts (flows/malloc.py), for itself
and the processes it starts; a user's own MALLOC_ARENA_MAX is left alone."""

from __future__ import annotations

import os
import subprocess
import sys

SEEN = (
    "import os; from booksmith.flows import cli; "
    "cli.app = lambda **k: print(os.environ.get('MALLOC_ARENA_MAX')); cli.main()"
)


def _arenas_seen(env: dict[str, str]) -> str:
    done = subprocess.run(
        [sys.executable, "-c", SEEN], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_the_cli_caps_arenas_unless_the_user_set_them() -> None:
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"}
    assert _arenas_seen(env) == "2"
    assert _arenas_seen({**env, "MALLOC_ARENA_MAX": "6"}) == "6"
