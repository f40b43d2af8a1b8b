"""The CLI sets its allocators before any thread starts (flows/malloc.py): two glibc arenas, a
fixed mmap threshold and Arrow on the system allocator, for itself and, through the
environment, the processes it starts; a user's own setting of any of them is left alone."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from booksmith.flows.malloc import SETTINGS

SEEN = f"""
import json, os, subprocess, sys
from booksmith.flows import cli

CHILD = "import pyarrow as pa; print(pa.default_memory_pool().backend_name)"


def app(**k):
    import pyarrow as pa

    child = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True)
    env = {{name: os.environ.get(name) for name in {list(SETTINGS)!r}}}
    pool = pa.default_memory_pool().backend_name
    print(json.dumps({{"env": env, "pool": pool, "child_pool": child.stdout.strip()}}))


cli.app = app
cli.main()
"""


def _seen(env: dict[str, str]) -> dict[str, object]:
    done = subprocess.run(
        [sys.executable, "-c", SEEN], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def test_the_cli_sets_its_allocators_unless_the_user_set_them() -> None:
    env = {k: v for k, v in os.environ.items() if k not in SETTINGS}
    seen = _seen(env)
    assert seen["env"] == SETTINGS
    assert seen["pool"] == seen["child_pool"] == "system"  # Arrow's, here and in a child

    mine = {"MALLOC_ARENA_MAX": "6", "ARROW_DEFAULT_MEMORY_POOL": "jemalloc"}
    seen = _seen({**env, **mine})
    assert seen["env"] == {**SETTINGS, **mine}
    assert seen["pool"] == seen["child_pool"] == "jemalloc"
